"""Container images of the workloads, one ImageSpec per family.

Package lists come from pyproject.toml (the base dependencies plus a workload's extra), so the
image and `pip install .[extra]` never drift apart. Registry from FLYRAY_REGISTRY (default
localhost:30000, the Flyte sandbox's); the tag is derived from the spec's content by flytekit,
so a changed dependency gives a new tag (FLYRAY_IMAGE_TAG_FORMAT, e.g. "{spec_hash}-prod", adds
to it). wget is there for KubeRay's head/worker probes.

Flyte tasks get their code by fast registration, so the workload images hold packages only;
`standalone` also holds the code, for the RayJob of k8s/ray/ that runs without Flyte.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from flytekit import ImageSpec

_PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
_DEPS = _PROJECT["project"]["dependencies"]
_EXTRAS = _PROJECT["project"]["optional-dependencies"]


_REGISTRY = os.environ.get("FLYRAY_REGISTRY", "localhost:30000")
_TAG_FORMAT = os.environ.get("FLYRAY_IMAGE_TAG_FORMAT") or None


def _spec(name: str, *extras: str, env: dict[str, str] | None = None, **kwargs) -> ImageSpec:
    packages = list(_DEPS) + [p for extra in extras for p in _EXTRAS[extra]]
    return ImageSpec(
        name=f"flyray-{name}",
        python_version="3.11",
        packages=packages,
        apt_packages=["wget"],
        registry=_REGISTRY,
        tag_format=_TAG_FORMAT,
        env={"PYTHONUNBUFFERED": "1", **(env or {})},
        **kwargs,
    )


recommender = _spec("recommender", "recommender")
tabular = _spec("tabular", "tabular")
# tf-keras (Keras 2): Keras 3 + MultiWorkerMirroredStrategy breaks on CPU (ray-project/ray#47464)
image = _spec("tensorflow", "image", env={"TF_USE_LEGACY_KERAS": "1"})
clip = _spec("torch", "clip")
standalone = _spec(
    "standalone", "recommender",
    copy=["flyray", "tasks", "workflows", "images", "pyproject.toml"],  # relative to the repo root
)  # fmt: skip

# Ray Serve for every workload's champion (k8s/ray/rayservice.yaml): all extras and the code.
serve = _spec(
    "serve", "recommender", "tabular", "image", "clip", env={"TF_USE_LEGACY_KERAS": "1"},
    copy=["flyray", "pyproject.toml"],
)  # fmt: skip

# The MLflow tracking server of k8s/mlflow.yaml: Postgres backend store, artifacts on MinIO.
mlflow_server = ImageSpec(
    name="flyray-mlflow-server",
    python_version="3.11",
    packages=[p for p in _DEPS if p.startswith("mlflow")] + ["psycopg[binary]>=3.2", "boto3>=1.34"],
    registry=_REGISTRY,
    tag_format=_TAG_FORMAT,
)
