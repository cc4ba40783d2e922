"""Deployment facts: one typed object, read from the environment once, when the task modules
are imported for registration (Flyte fixes a task's pods, secrets and timeout then), and
carried into every task's environment so that what runs reads what was registered: the
@dynamic that sizes a trainer's Ray cluster at run time builds the same pods, secrets and
checkpoint root. What changes per run is a workflow input, never one of these.

  FLYRAY_RAY_WORKER_CPU (2)  FLYRAY_RAY_WORKER_MEM (8Gi)   one Ray worker pod
  FLYRAY_RAY_HEAD_CPU (2)    FLYRAY_RAY_HEAD_MEM (8Gi)     the Ray head pod
  FLYRAY_RAY_WORKERS (2)     worker pods of Ray tasks that are not sized by a run's
                             DistributedConfig (ingest, features, tuning, embedding)
  FLYRAY_S3_SECRET_GROUP     Flyte secret group holding aws_access_key_id and
                             aws_secret_access_key, mounted as AWS_ACCESS_KEY_ID/_SECRET_ACCESS_KEY
                             (unset: credentials come from the pod's environment)
  FLYRAY_K8S_CONFIGMAP (flyray-env)  FLYRAY_K8S_SECRET (flyray-s3)   what every Ray pod takes its
                             environment from (endpoints, S3 keys; see k8s/)
  FLYRAY_K8S_MLFLOW_SECRET (flyray-mlflow-pipeline)   the Secret that gives every Ray pod the
                             pipeline identity of MLflow (MLFLOW_TRACKING_USERNAME/_PASSWORD)
  FLYRAY_GATE_SECRET_GROUP (flyray-mlflow-gate)   the Flyte secret group (keys username,
                             password) of the gate's identity, requested by the register tasks
                             only: the one identity the MLflow server lets move an alias
  FLYRAY_CHECKPOINT_ROOT     where retried tasks find their checkpoints (default: beside the
                             execution's raw outputs)
  FLYRAY_CLIP_WORKER_GPUS (0)  FLYRAY_CNN_WORKER_GPUS (0)   GPUs of each worker pod of a workload
  FLYRAY_GPU_TOLERATIONS     JSON list of Kubernetes tolerations of GPU worker pods (default: the
                             nvidia.com/gpu taint)
  FLYRAY_GPU_NODE_SELECTOR   JSON object of node labels that GPU worker pods select (default none)
  FLYRAY_TIMEOUT_SCALE (1)   multiplies every task's timeout (bigger data, slower nodes)
  FLYRAY_CODE_VERSION        the commit registered (default: the checkout's HEAD, "+dirty" with
                             uncommitted changes), recorded in every registered version's lineage
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flyray.lineage import code_version

# The taint that GPU node pools carry (GKE, EKS and AKS GPU nodes; the NVIDIA GPU operator).
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

# Ray cluster shape; k8s/render.py fills the standalone RayCluster from the same settings.
RAY_DEFAULTS = {
    "FLYRAY_RAY_WORKERS": "2",
    "FLYRAY_RAY_WORKER_CPU": "2",
    "FLYRAY_RAY_WORKER_MEM": "8Gi",
    "FLYRAY_RAY_HEAD_CPU": "2",
    "FLYRAY_RAY_HEAD_MEM": "8Gi",
}
VARIABLES = (
    *RAY_DEFAULTS, "FLYRAY_S3_SECRET_GROUP", "FLYRAY_K8S_CONFIGMAP", "FLYRAY_K8S_SECRET",
    "FLYRAY_K8S_MLFLOW_SECRET", "FLYRAY_GATE_SECRET_GROUP", "FLYRAY_CHECKPOINT_ROOT",
    "FLYRAY_CLIP_WORKER_GPUS", "FLYRAY_CNN_WORKER_GPUS", "FLYRAY_GPU_TOLERATIONS",
    "FLYRAY_GPU_NODE_SELECTOR", "FLYRAY_TIMEOUT_SCALE",
)  # fmt: skip


@dataclass(frozen=True)
class Deployment:
    """Where and how the tasks run on a cluster (the variables above, parsed and checked)."""

    ray_workers: int = 2
    ray_worker_cpu: str = "2"
    ray_worker_mem: str = "8Gi"
    ray_head_cpu: str = "2"
    ray_head_mem: str = "8Gi"
    s3_secret_group: str = ""
    k8s_configmap: str = "flyray-env"
    k8s_secret: str = "flyray-s3"
    k8s_mlflow_secret: str = "flyray-mlflow-pipeline"
    gate_secret_group: str = "flyray-mlflow-gate"
    checkpoint_root: str = ""
    clip_worker_gpus: int = 0
    cnn_worker_gpus: int = 0
    gpu_tolerations: tuple[dict, ...] = (GPU_TAINT,)
    gpu_node_selector: tuple[tuple[str, str], ...] = ()
    timeout_scale: float = 1.0
    code_version: str = ""
    # Read at registration only: where images go, and the nightly launch plan's settings.
    image_registry: str = "localhost:30000"
    image_tag_format: str = ""
    nightly_source: str = ""
    nightly_window_days: int = 30
    nightly_notify: tuple[str, ...] = ()
    # The variables that were set, carried into every task's environment.
    environment: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Deployment:
        """The deployment the variables describe; a bad value is an error naming its variable."""

        def get(name: str, default: str) -> str:
            return env.get(name) or default

        def number(name: str, default: str, kind: type):
            text = get(name, default)
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"{name}: expected a {kind.__name__}, got {text!r}") from None

        ray = {name: get(name, default) for name, default in RAY_DEFAULTS.items()}
        # the commit of the code being registered, carried to every task like the facts above
        code = env.get("FLYRAY_CODE_VERSION") or code_version(Path(__file__).resolve().parents[1])
        selector = _json(env, "FLYRAY_GPU_NODE_SELECTOR", {}, dict)
        if not all(isinstance(v, str) for v in selector.values()):
            raise ValueError(
                f"FLYRAY_GPU_NODE_SELECTOR: label values must be strings, got {selector}"
            )
        return cls(
            ray_workers=number("FLYRAY_RAY_WORKERS", "2", int),
            ray_worker_cpu=ray["FLYRAY_RAY_WORKER_CPU"],
            ray_worker_mem=ray["FLYRAY_RAY_WORKER_MEM"],
            ray_head_cpu=ray["FLYRAY_RAY_HEAD_CPU"],
            ray_head_mem=ray["FLYRAY_RAY_HEAD_MEM"],
            s3_secret_group=get("FLYRAY_S3_SECRET_GROUP", ""),
            k8s_configmap=get("FLYRAY_K8S_CONFIGMAP", "flyray-env"),
            k8s_secret=get("FLYRAY_K8S_SECRET", "flyray-s3"),
            k8s_mlflow_secret=get("FLYRAY_K8S_MLFLOW_SECRET", "flyray-mlflow-pipeline"),
            gate_secret_group=get("FLYRAY_GATE_SECRET_GROUP", "flyray-mlflow-gate"),
            checkpoint_root=get("FLYRAY_CHECKPOINT_ROOT", ""),
            clip_worker_gpus=number("FLYRAY_CLIP_WORKER_GPUS", "0", int),
            cnn_worker_gpus=number("FLYRAY_CNN_WORKER_GPUS", "0", int),
            gpu_tolerations=tuple(_tolerations(env)),
            gpu_node_selector=tuple(selector.items()),
            timeout_scale=number("FLYRAY_TIMEOUT_SCALE", "1", float),
            image_registry=get("FLYRAY_REGISTRY", "localhost:30000"),
            image_tag_format=get("FLYRAY_IMAGE_TAG_FORMAT", ""),
            nightly_source=get("FLYRAY_NIGHTLY_SOURCE", ""),
            nightly_window_days=number("FLYRAY_NIGHTLY_WINDOW_DAYS", "30", int),
            nightly_notify=tuple(
                a.strip() for a in get("FLYRAY_NIGHTLY_NOTIFY", "").split(",") if a.strip()
            ),
            code_version=code,
            environment=tuple((n, env[n]) for n in VARIABLES if n in env)
            + ((("FLYRAY_CODE_VERSION", code),) if code else ()),
        )


@functools.cache
def current() -> Deployment:
    """The deployment of this process, read once (registration, or a task's own pod)."""
    return Deployment.from_env()


def _tolerations(env: Mapping[str, str]) -> list[dict]:
    from kubernetes.client import V1Toleration

    fields = set(V1Toleration.attribute_map.values())
    tolerations = _json(env, "FLYRAY_GPU_TOLERATIONS", [GPU_TAINT], list)
    for i, toleration in enumerate(tolerations):
        unknown = set(toleration) - fields if isinstance(toleration, dict) else {"(type)"}
        if unknown:
            raise ValueError(f"FLYRAY_GPU_TOLERATIONS[{i}]: expected a toleration with fields "
                             f"{sorted(fields)}, got {toleration!r}")  # fmt: skip
    return tolerations


def _json(env: Mapping[str, str], name: str, default, kind: type):
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}: not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{name}: expected a JSON {kind.__name__}, got {text!r}")
    return value
