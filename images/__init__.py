"""Container images of the workloads, one ImageSpec per family.

Each installs exactly what uv.lock resolved for its extras (images/requirements/<family>.txt,
exported from the lock by `make lock`), so an image and `make setup` hold the same versions, and
flytekit's content-derived tag changes exactly when a resolved version does. Registry from
FLYRAY_REGISTRY (default localhost:30000, the Flyte sandbox's); FLYRAY_IMAGE_TAG_FORMAT (e.g.
"{spec_hash}-prod") decorates the tag. wget is there for KubeRay's head/worker probes; torch's
CPU build comes from PyTorch's index, as uv.lock names it (+cpu).

Flyte tasks get their code by fast registration, so the workload images hold packages only;
`standalone` also holds the code, for the RayJob of k8s/ray/ that runs without Flyte.
"""

from __future__ import annotations

from flytekit import ImageSpec

from images.requirements import path as _locked
from tasks.deployment import current

_TORCH_CPU = ["https://download.pytorch.org/whl/cpu"]  # where torch==2.13.0+cpu is published
_REGISTRY = current().image_registry  # the deployment's facts, read once (tasks/deployment.py)
_TAG_FORMAT = current().image_tag_format or None


def _spec(name: str, env: dict[str, str] | None = None, **kwargs) -> ImageSpec:
    """`name`'s image: its locked requirements (images/requirements/<family>.txt)."""
    family = kwargs.pop("family", name)
    return ImageSpec(
        name=f"flyray-{name}",
        python_version="3.11",
        requirements=str(_locked(family)),
        apt_packages=["wget"],
        registry=_REGISTRY,
        tag_format=_TAG_FORMAT,
        env={"PYTHONUNBUFFERED": "1", **(env or {})},
        **kwargs,
    )


recommender = _spec("recommender")
tabular = _spec("tabular")
# tf-keras (Keras 2): Keras 3 + MultiWorkerMirroredStrategy breaks on CPU (ray-project/ray#47464)
image = _spec("tensorflow", env={"TF_USE_LEGACY_KERAS": "1"})
clip = _spec("torch", pip_extra_index_url=_TORCH_CPU)
standalone = _spec(
    "standalone", family="recommender",
    copy=["flyray", "tasks", "workflows", "images", "pyproject.toml"],  # relative to the repo root
)  # fmt: skip

# Ray Serve for every workload's champion (k8s/ray/rayservice.yaml): all extras and the code.
serve = _spec(
    "serve", env={"TF_USE_LEGACY_KERAS": "1"}, pip_extra_index_url=_TORCH_CPU,
    copy=["flyray", "pyproject.toml"],
)  # fmt: skip

# The MLflow tracking server of k8s/mlflow.yaml: Postgres backend store, artifacts on MinIO, and
# flyray itself without its dependencies, for its `flyray-auth` app (an entry point, so installed).
mlflow_server = ImageSpec(
    name="flyray-mlflow-server",
    python_version="3.11",
    requirements=str(_locked("mlflow-server")),
    copy=["flyray", "pyproject.toml", "README.md"],
    commands=["uv pip install --system --no-deps /root"],
    registry=_REGISTRY,
    tag_format=_TAG_FORMAT,
)
