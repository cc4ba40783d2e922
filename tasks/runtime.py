"""What every Flyte task of flyray shares: Ray cluster shape, S3 secrets, output location, logs.

Cluster shape comes from the environment at registration time (one documented place), so the
same code registers a small cluster for a demo and a large one for production:
  FLYRAY_RAY_WORKERS (default 2)    worker replicas; min/max via FLYRAY_RAY_WORKERS_MIN/_MAX
  FLYRAY_RAY_WORKER_CPU (2)  FLYRAY_RAY_WORKER_MEM (8Gi)
  FLYRAY_RAY_HEAD_CPU (2)    FLYRAY_RAY_HEAD_MEM (8Gi)
  FLYRAY_S3_SECRET_GROUP           Flyte secret group holding aws_access_key_id and
                                   aws_secret_access_key (unset: credentials come from the env)
"""

from __future__ import annotations

import logging
import os

from flytekit import Resources, Secret, current_context
from flytekit.core.context_manager import FlyteContextManager
from flytekit.types.directory import FlyteDirectory
from flytekitplugins.ray import HeadNodeConfig, RayJobConfig, WorkerNodeConfig

_S3_SECRET_KEYS = ("aws_access_key_id", "aws_secret_access_key")


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def ray_job() -> RayJobConfig:
    """One Ray cluster per task execution: a head and one worker group, torn down afterwards."""
    replicas = _env_int("FLYRAY_RAY_WORKERS", 2)
    worker_res = Resources(
        cpu=os.environ.get("FLYRAY_RAY_WORKER_CPU", "2"),
        mem=os.environ.get("FLYRAY_RAY_WORKER_MEM", "8Gi"),
    )
    head_res = Resources(
        cpu=os.environ.get("FLYRAY_RAY_HEAD_CPU", "2"),
        mem=os.environ.get("FLYRAY_RAY_HEAD_MEM", "8Gi"),
    )
    return RayJobConfig(
        head_node_config=HeadNodeConfig(
            ray_start_params={"num-cpus": "0"} if replicas else None,
            requests=head_res,
            limits=head_res,
        ),
        worker_node_config=[
            WorkerNodeConfig(
                group_name="workers",
                replicas=replicas,
                min_replicas=_env_int("FLYRAY_RAY_WORKERS_MIN", replicas),
                max_replicas=_env_int("FLYRAY_RAY_WORKERS_MAX", replicas),
                requests=worker_res,
                limits=worker_res,
            )
        ],
        shutdown_after_job_finishes=True,
        ttl_seconds_after_finished=600,
    )


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


def dir_uri(directory: FlyteDirectory) -> str:
    """Where a directory input lives, without downloading it (Ray workers read it in place)."""
    return directory.remote_source or directory.path


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("flyray").setLevel(logging.INFO)
