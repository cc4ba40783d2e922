"""The one task preamble of flyray: every Flyte task is declared with `flyray_task`, which applies
image, cache, retries, transient-error classification, secret requests, resources, a timeout and
logging in one place. Beside it, one concern a module: the deployment's settings
(tasks/deployment.py), the Ray cluster a task gets (tasks/raycluster.py), which failures are
retried (tasks/retries.py), and where outputs, checkpoints and decks go (tasks/outputs.py).
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable
from dataclasses import replace

from flytekit import Cache, Resources, Secret, dynamic, task
from flytekit.exceptions.user import FlyteRecoverableException

from flyray import console
from flyray.raytrain import DistributedConfig
from tasks.deployment import Deployment, current
from tasks.outputs import checkpoint_uri, gate_secrets
from tasks.raycluster import ray_job
from tasks.retries import is_transient

_S3_SECRET_KEYS = ("aws_access_key_id", "aws_secret_access_key")
# For a task that does not size its own (every flyray task does: docs/configuration.md).
DEFAULT_TIMEOUT = datetime.timedelta(hours=1)


def minutes(n: float) -> datetime.timedelta:
    return datetime.timedelta(minutes=n)


def storage_secrets(deploy: Deployment | None = None) -> list[Secret]:
    """The S3 credentials as Flyte secrets, mounted by Flyte straight into the variables that
    flyray.storage reads (values never pass through flyray's code or logs)."""
    group = (deploy or current()).s3_secret_group
    if not group:
        return []
    return [
        Secret(
            group=group, key=key, env_var=key.upper(), mount_requirement=Secret.MountType.ENV_VAR
        )
        for key in _S3_SECRET_KEYS
    ]


def _preamble(fn: Callable) -> Callable:
    """One console line as the task starts and ends (flyray.console), and transient failures
    made recoverable: flytekit reports every user exception as non-recoverable (never retried);
    a flaky store or a lost node is re-raised as FlyteRecoverableException so `retries=` covers
    it, while bad input fails at once."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with console.task_lines(fn.__name__):
                return fn(*args, **kwargs)
        except Exception as exc:
            if is_transient(exc):
                raise FlyteRecoverableException(f"transient failure, retrying: {exc}") from exc
            raise

    return wrapper


def flyray_task(
    image,
    *,
    ray: DistributedConfig | bool = False,
    worker_gpus: int = 0,
    cache: str = "",
    cache_ignore: tuple[str, ...] = (),
    retries: int = 2,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    storage: bool = True,
    deck: bool = False,
    resources: Resources | None = None,
    sizes: bool = False,
    checkpoints: str = "",
    gate: bool = False,
) -> Callable:
    """Declare a flyray task. `ray`: run on a per-execution Ray cluster (a DistributedConfig
    sizes it; training tasks are resized per run by `sized_by_run`); `cache`: a cache version (bump
    it when the code changes what the task writes; serialized, so concurrent runs compute once);
    `storage`: the task reads or writes object storage, so it requests the S3 secrets;
    `timeout`: the task's bound, sized to its work (`minutes`; FLYRAY_TIMEOUT_SCALE scales it); a
    cached task without GPUs is interruptible (it may run on spot nodes: a retry resumes or hits
    the cache);
    `resources`: requests = limits of a plain (non-Ray) pod; `sizes`: a @dynamic that starts a
    Ray task on a cluster sized for the run (see `sized_by_run`); `checkpoints`: a trainer's name:
    its `config: DistributedConfig` input gets the checkpoint folder that a Flyte retry of the
    same node finds again (see `checkpoint_uri`), so a retry resumes where the attempt stopped;
    `gate`: the task runs the champion gate, so it requests the gate's identity."""
    deploy = current()
    if ray:
        config = ray if isinstance(ray, DistributedConfig) else None
        task_config = ray_job(config, worker_gpus, deploy)
    else:
        task_config = None
    options = {
        "container_image": image,
        "task_config": task_config,
        "retries": retries,
        "timeout": timeout if sizes else timeout * deploy.timeout_scale,
        "interruptible": bool(cache) and not worker_gpus,
        "secret_requests": (storage_secrets(deploy) if storage and not sizes else [])
        + (gate_secrets(deploy) if gate else []),
        "enable_deck": deck,
        "environment": dict(deploy.environment),
    }
    if cache:
        options["cache"] = Cache(version=cache, serialize=True, ignored_inputs=cache_ignore)
    if resources is not None:
        options.update(requests=resources, limits=resources)

    def declare(fn: Callable):
        body = _with_checkpoints(fn, checkpoints) if checkpoints else fn
        return (dynamic if sizes else task)(**options)(_preamble(body))

    return declare


def _with_checkpoints(fn: Callable, name: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(**inputs):
        config = inputs["config"]
        folder = checkpoint_uri(config, name, inputs)
        return fn(**{**inputs, "config": replace(config, checkpoint_uri=folder)})

    return wrapper


def sized_by_run(ray_task, name: str, worker_gpus: int = 0):
    """A @dynamic called `name`, with `ray_task`'s inputs and outputs, that runs `ray_task` on
    a Ray cluster sized for the run's `config: DistributedConfig` input (`worker_pods`): the
    one worker-count knob of a run sizes the trainer and the cluster it gets. (Flyte fixes a
    task's cluster when it is registered; only a dynamic can choose one per run.)"""

    def start(**inputs):
        config = ray_job(inputs["config"], worker_gpus)
        return ray_task(**inputs).with_overrides(task_config=config)

    functools.update_wrapper(start, ray_task.task_function)  # its signature and type hints
    start.__name__ = start.__qualname__ = name
    # A dynamic node's deadline covers the nodes it starts: the trainer's (scaled) timeout and
    # a few minutes for the sizing pod.
    timeout = ray_task.metadata.timeout + minutes(10)
    return flyray_task(ray_task.container_image, sizes=True, timeout=timeout)(start)
