"""What every Flyte task of flyray shares: Ray cluster shape, S3 secrets, output location, logs.

Cluster shape comes from the environment at registration time (one documented place), so the
same code registers a small cluster for a demo and a large one for production:
  FLYRAY_RAY_WORKERS (default 2)    worker replicas; min/max via FLYRAY_RAY_WORKERS_MIN/_MAX
  FLYRAY_RAY_WORKER_CPU (2)  FLYRAY_RAY_WORKER_MEM (8Gi)
  FLYRAY_RAY_HEAD_CPU (2)    FLYRAY_RAY_HEAD_MEM (8Gi)
  FLYRAY_S3_SECRET_GROUP           Flyte secret group holding aws_access_key_id and
                                   aws_secret_access_key (unset: credentials come from the env)
  FLYRAY_K8S_CONFIGMAP (flyray-env)  FLYRAY_K8S_SECRET (flyray-s3)
                                   ConfigMap and Secret that every Ray head and worker pod takes
                                   its environment from (endpoints, S3 keys; see k8s/), so Ray
                                   workers on other pods reach MinIO and MLflow too
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

from flytekit import PodTemplate, Resources, Secret, StructuredDataset, current_context
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.resources import pod_spec_from_resources
from flytekit.exceptions.user import FlyteRecoverableException
from flytekit.types.directory import FlyteDirectory
from flytekitplugins.ray import HeadNodeConfig, RayJobConfig, WorkerNodeConfig

_S3_SECRET_KEYS = ("aws_access_key_id", "aws_secret_access_key")
# The `flytekit` user of ImageSpec images; numeric so that runAsNonRoot can be verified.
RUN_AS_USER = 1000


# Ray cluster shape; k8s/render.py fills the standalone RayCluster from the same settings.
RAY_DEFAULTS = {
    "FLYRAY_RAY_WORKERS": "2",
    "FLYRAY_RAY_WORKER_CPU": "2",
    "FLYRAY_RAY_WORKER_MEM": "8Gi",
    "FLYRAY_RAY_HEAD_CPU": "2",
    "FLYRAY_RAY_HEAD_MEM": "8Gi",
}


def ray_setting(name: str) -> str:
    return os.environ.get(name, RAY_DEFAULTS[name])


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def ray_job(worker_gpus: int = 0) -> RayJobConfig:
    """One Ray cluster per task execution: a head and one worker group, torn down afterwards.
    `worker_gpus` > 0 gives each worker pod that many GPUs."""
    replicas = int(ray_setting("FLYRAY_RAY_WORKERS"))
    worker_res = Resources(
        cpu=ray_setting("FLYRAY_RAY_WORKER_CPU"),
        mem=ray_setting("FLYRAY_RAY_WORKER_MEM"),
        gpu=worker_gpus or None,
    )
    head_res = Resources(
        cpu=ray_setting("FLYRAY_RAY_HEAD_CPU"), mem=ray_setting("FLYRAY_RAY_HEAD_MEM")
    )
    return RayJobConfig(
        head_node_config=HeadNodeConfig(
            ray_start_params={"num-cpus": "0"} if replicas else None,
            pod_template=_ray_pod("ray-head", head_res),
        ),
        worker_node_config=[
            WorkerNodeConfig(
                group_name="workers",
                replicas=replicas,
                min_replicas=_env_int("FLYRAY_RAY_WORKERS_MIN", replicas),
                max_replicas=_env_int("FLYRAY_RAY_WORKERS_MAX", replicas),
                pod_template=_ray_pod("ray-worker", worker_res),
            )
        ],
        shutdown_after_job_finishes=True,
        ttl_seconds_after_finished=600,
    )


def _ray_pod(container: str, resources: Resources) -> PodTemplate:
    """A Ray head or worker pod: fixed resources, non-root, environment from the ConfigMap and
    Secret of k8s/ (both optional, so a cluster without them still starts)."""
    from kubernetes.client import (
        V1Capabilities,
        V1ConfigMapEnvSource,
        V1EnvFromSource,
        V1PodSecurityContext,
        V1SeccompProfile,
        V1SecretEnvSource,
        V1SecurityContext,
    )

    spec = pod_spec_from_resources(container, requests=resources, limits=resources)
    spec.security_context = V1PodSecurityContext(
        run_as_non_root=True, run_as_user=RUN_AS_USER, fs_group=RUN_AS_USER,
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
    )  # fmt: skip
    [primary] = spec.containers
    primary.security_context = V1SecurityContext(
        allow_privilege_escalation=False, capabilities=V1Capabilities(drop=["ALL"])
    )
    primary.env_from = [
        V1EnvFromSource(config_map_ref=V1ConfigMapEnvSource(
            name=os.environ.get("FLYRAY_K8S_CONFIGMAP", "flyray-env"), optional=True)),
        V1EnvFromSource(secret_ref=V1SecretEnvSource(
            name=os.environ.get("FLYRAY_K8S_SECRET", "flyray-s3"), optional=True)),
    ]  # fmt: skip
    return PodTemplate(pod_spec=spec, primary_container_name=container)


def s3_secret_requests() -> list[Secret]:
    group = os.environ.get("FLYRAY_S3_SECRET_GROUP")
    return [Secret(group=group, key=k) for k in _S3_SECRET_KEYS] if group else []


def export_s3_secrets() -> None:
    """Copy Flyte secrets into the AWS variables that flyray.storage reads (values never logged)."""
    group = os.environ.get("FLYRAY_S3_SECRET_GROUP")
    if not group:
        return
    secrets = current_context().secrets
    for key in _S3_SECRET_KEYS:
        os.environ.setdefault(key.upper(), secrets.get(group, key))


def new_output_dir() -> str:
    """A fresh directory under the execution's raw-output prefix (s3:// on a cluster)."""
    return FlyteContextManager.current_context().file_access.get_random_remote_directory()


def dataset_uri(dataset: StructuredDataset) -> str:
    """Where a dataset input lives, without downloading it (its literal carries the location)."""
    return dataset.uri or dataset.literal.uri


def dir_uri(directory: FlyteDirectory) -> str:
    """Where a directory input lives, without downloading it (Ray workers read it in place)."""
    return directory.remote_source or directory.path


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("flyray").setLevel(logging.INFO)


# What a flaky store, network or lost node looks like; bad input never matches these.
_TRANSIENT_TYPES = (ConnectionError, TimeoutError)
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "ObjectLostError",
    "OwnerDiedError", "NodeDiedError", "ObjectReconstructionFailedError",
}  # fmt: skip
_TRANSIENT_TEXT = (
    "NETWORK_CONNECTION", "curlCode", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
    "Connection refused", "Connection reset", "timed out", "Max retries exceeded",
    "503 Server Error", "502 Server Error", "504 Server Error",
)  # fmt: skip


def is_transient(exc: BaseException) -> bool:
    """True when the error, or one it was raised from (Ray task errors included), is a network,
    storage-service or node failure that a retry can outlive."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        names = {t.__name__ for t in type(e).__mro__}
        if isinstance(e, _TRANSIENT_TYPES) or names & _TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and any(t in str(e) for t in _TRANSIENT_TEXT):
            return True
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return False


def transient_retries(fn: Callable) -> Callable:
    """Let Flyte retry a task on transient failures only. flytekit reports every user exception
    as non-recoverable (no retry); this re-raises transient ones as FlyteRecoverableException,
    so `retries=` covers a flaky store or a lost node, while bad input fails at once."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if is_transient(exc):
                raise FlyteRecoverableException(f"transient failure, retrying: {exc}") from exc
            raise

    return wrapper
