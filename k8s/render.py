"""Render k8s/ manifests: fill their ${VARIABLE}s, print one YAML stream for `kubectl apply -f -`.

    python k8s/render.py k8s/namespace.yaml k8s/secrets.template.yaml ... | kubectl apply -f -

Values come from the environment; image names from images/ (tags derived from content, so the
manifests always name the images `make images` built); Ray sizes from the same FLYRAY_RAY_*
settings the Flyte tasks use. Secret variables have no default: rendering stops, naming what is
missing, and no value is ever printed to the terminal except in the YAML on stdout.
Only ${UPPER_CASE} is a placeholder: $SHELL_VARS in container commands and Flyte's
{{ namespace }} pass through untouched.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
SECRETS = (
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "FLYRAY_S3_ACCESS_KEY",
    "FLYRAY_S3_SECRET_KEY",
    "POSTGRES_PASSWORD",
    "FLYRAY_RAY_AUTH_TOKEN",
    "MLFLOW_S3_ACCESS_KEY",
    "MLFLOW_S3_SECRET_KEY",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SECRET_KEY",
    "FLYRAY_MLFLOW_PIPELINE_PASSWORD",
    "FLYRAY_MLFLOW_GATE_PASSWORD",
    "FLYRAY_MLFLOW_SERVING_PASSWORD",
    "FLYRAY_MLFLOW_PEOPLE_PASSWORD",
)
INTEGERS = ("FLYRAY_RAY_WORKERS",)
# The platform, in apply order (the Helm charts come between namespace/secrets and the rest).
PLATFORM = (
    "namespace.yaml",
    "secrets.template.yaml",
    "postgres.yaml",
    "minio.yaml",
    "mlflow.yaml",
    "network.yaml",
)
STANDALONE = ("ray/raycluster.yaml", "ray/rayjob.yaml")


class RenderError(Exception):
    pass


def _image(name: str) -> Callable[[], str]:
    def resolve() -> str:
        sys.path.insert(0, str(REPO))
        import images

        return getattr(images, name).image_name()

    return resolve


def _defaults() -> dict[str, str | Callable[[], str]]:
    sys.path.insert(0, str(REPO))
    from tasks.deployment import RAY_DEFAULTS

    return {
        **RAY_DEFAULTS,
        "FLYRAY_TASK_NAMESPACE": "flyray-development",
        "FLYRAY_BUCKET": "flyray",
        "FLYRAY_SOURCE": "s3://flyray/clickstream/",
        "MINIO_STORAGE": "50Gi",
        "FLYRAY_IMAGE": _image("standalone"),
        "FLYRAY_SERVE_IMAGE": _image("serve"),
        "MLFLOW_IMAGE": _image("mlflow_server"),
    }


def _value(name: str, env: dict[str, str], defaults: dict) -> str:
    if env.get(name):
        value = env[name]
    elif name in SECRETS:
        raise RenderError(f"{name} is not set (a secret: export it, it has no default)")
    elif name in defaults:
        value = defaults[name]() if callable(defaults[name]) else defaults[name]
    else:
        raise RenderError(f"{name} is not set and has no default")
    if name in SECRETS and any(c in value for c in '"\\\n'):
        raise RenderError(f"{name} must not contain quotes, backslashes or newlines")
    return value


def _fill(node, env: dict[str, str], defaults: dict):
    if isinstance(node, dict):
        return {_fill(k, env, defaults): _fill(v, env, defaults) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, env, defaults) for v in node]
    if isinstance(node, str):
        whole = PLACEHOLDER.fullmatch(node)
        filled = PLACEHOLDER.sub(lambda m: _value(m.group(1), env, defaults), node)
        return int(filled) if whole and whole.group(1) in INTEGERS else filled
    return node


def render(paths: list[str | Path], env: dict[str, str] | None = None) -> list[dict]:
    """The manifests' documents with every placeholder filled (env defaults to os.environ)."""
    env = dict(os.environ) if env is None else env
    defaults = _defaults()
    docs = []
    for path in paths:
        try:
            loaded = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        except yaml.YAMLError as err:
            raise RenderError(f"{path}: not valid YAML: {err}") from err
        for doc in loaded:
            try:
                docs.append(_fill(doc, env, defaults))
            except RenderError as err:
                raise RenderError(f"{path}: {err}") from None
    return docs


def main(argv: list[str]) -> int:
    groups = {"platform": PLATFORM, "standalone": STANDALONE}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + f"\nGroups: {', '.join(groups)} (or manifest paths)", file=sys.stderr)
        return 2
    paths = [REPO / "k8s" / f for a in argv for f in groups[a]] if argv[0] in groups else argv
    try:
        docs = render(paths)
    except RenderError as err:
        print(f"render: {err}", file=sys.stderr)
        return 2
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
