"""The one task preamble of flyray: every Flyte task is declared with `flyray_task`, which applies
image, cache, retries, transient-error classification, secret requests, resources, a timeout and
logging in one place; plus the Ray cluster a task asks for, where its outputs and checkpoints go,
and how decks are published.

Deployment facts come from the environment when the workflows are registered (docs: the
configuration table); what changes per run is a workflow input:
  FLYRAY_RAY_WORKER_CPU (2)  FLYRAY_RAY_WORKER_MEM (8Gi)   one Ray worker pod
  FLYRAY_RAY_HEAD_CPU (2)    FLYRAY_RAY_HEAD_MEM (8Gi)     the Ray head pod
  FLYRAY_RAY_WORKERS (2)     worker pods of Ray tasks that are not sized by a run's
                             DistributedConfig (ingest, features, evaluation, embedding)
  FLYRAY_S3_SECRET_GROUP     Flyte secret group holding aws_access_key_id and
                             aws_secret_access_key, mounted as AWS_ACCESS_KEY_ID/_SECRET_ACCESS_KEY
                             (unset: credentials come from the pod's environment)
  FLYRAY_K8S_CONFIGMAP (flyray-env)  FLYRAY_K8S_SECRET (flyray-s3)   what every Ray pod takes its
                             environment from (endpoints, S3 keys; see k8s/)
  FLYRAY_CHECKPOINT_ROOT     where retried tasks find their checkpoints (default: beside the
                             execution's raw outputs)
  FLYRAY_GPU_TOLERATIONS     JSON list of Kubernetes tolerations of GPU worker pods (default: the
                             nvidia.com/gpu taint)
  FLYRAY_GPU_NODE_SELECTOR   JSON object of node labels that GPU worker pods select (default none)
  FLYRAY_TIMEOUT_SCALE (1)   multiplies every task's timeout (bigger data, slower nodes)
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import asdict, is_dataclass, replace

from flytekit import Cache, Deck, PodTemplate, Resources, Secret, StructuredDataset, dynamic, task
from flytekit import current_context as _current_context
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.resources import pod_spec_from_resources
from flytekit.exceptions.user import FlyteRecoverableException
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from flytekitplugins.ray import HeadNodeConfig, RayJobConfig, WorkerNodeConfig

from flyray import console, registry, ui
from flyray.raytrain import DistributedConfig
from flyray.registry import Candidate, RegistryConfig

_S3_SECRET_KEYS = ("aws_access_key_id", "aws_secret_access_key")
# The `flytekit` user of ImageSpec images; numeric so that runAsNonRoot can be verified.
RUN_AS_USER = 1000
# For a task that does not size its own (every flyray task does: docs/configuration.md).
DEFAULT_TIMEOUT = datetime.timedelta(hours=1)
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


# Deployment facts, read when the workflows are registered. Every task carries the ones that are
# set in its environment, so what runs reads what was registered: the @dynamic that sizes a
# trainer's Ray cluster at run time builds the same pods, secrets and checkpoint root.
DEPLOYMENT_VARIABLES = (
    *RAY_DEFAULTS, "FLYRAY_S3_SECRET_GROUP", "FLYRAY_K8S_CONFIGMAP", "FLYRAY_K8S_SECRET",
    "FLYRAY_CHECKPOINT_ROOT", "FLYRAY_CLIP_WORKER_GPUS", "FLYRAY_CNN_WORKER_GPUS",
    "FLYRAY_GPU_TOLERATIONS", "FLYRAY_GPU_NODE_SELECTOR", "FLYRAY_TIMEOUT_SCALE",
)  # fmt: skip


def deployment_environment() -> dict[str, str]:
    return {name: os.environ[name] for name in DEPLOYMENT_VARIABLES if name in os.environ}


def minutes(n: float) -> datetime.timedelta:
    return datetime.timedelta(minutes=n)


def timeout_scale() -> float:
    return float(os.environ.get("FLYRAY_TIMEOUT_SCALE") or 1)


def ray_setting(name: str) -> str:
    return os.environ.get(name, RAY_DEFAULTS[name])


def worker_pods(config: DistributedConfig, worker_gpus: int = 0) -> tuple[int, int]:
    """(min, max) Ray worker pods that place `config`'s training workers: each pod has
    FLYRAY_RAY_WORKER_CPU CPUs (and `worker_gpus` GPUs), each worker reserves `cpus_per_worker`
    (and one GPU when the pods have GPUs)."""
    per_pod = max(1, int(float(ray_setting("FLYRAY_RAY_WORKER_CPU")) // config.cpus_per_worker))
    if worker_gpus:
        per_pod = min(per_pod, worker_gpus)
    most = math.ceil(config.workers / per_pod)
    least = (
        math.ceil(config.min_workers / per_pod) if 0 < config.min_workers < config.workers else most
    )
    return least, most


def ray_job(config: DistributedConfig | None = None, worker_gpus: int = 0) -> RayJobConfig:
    """One Ray cluster per task execution: a head (schedules only) and one worker group, torn down
    afterwards. Sized by a run's DistributedConfig when given (autoscaling between its min and
    max), else by FLYRAY_RAY_WORKERS. `worker_gpus` > 0 gives each worker pod that many GPUs."""
    if config is None:
        least = most = int(ray_setting("FLYRAY_RAY_WORKERS"))
    else:
        least, most = worker_pods(config, worker_gpus)
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
            ray_start_params={"num-cpus": "0"} if most else None,
            pod_template=_ray_pod("ray-head", head_res),
        ),
        worker_node_config=[
            WorkerNodeConfig(
                group_name="workers",
                replicas=most,
                min_replicas=least,
                max_replicas=most,
                pod_template=_ray_pod("ray-worker", worker_res, gpu=bool(worker_gpus)),
            )
        ],
        enable_autoscaling=least < most,
        shutdown_after_job_finishes=True,
        ttl_seconds_after_finished=600,
    )


def _ray_pod(container: str, resources: Resources, gpu: bool = False) -> PodTemplate:
    """A Ray head or worker pod: fixed resources, non-root, environment from the ConfigMap and
    Secret of k8s/ (both optional, so a cluster without them still starts); a GPU pod takes the
    deployment's GPU tolerations and node selector (`gpu_scheduling`)."""
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
    if gpu:
        spec.tolerations, spec.node_selector = gpu_scheduling()
    return PodTemplate(pod_spec=spec, primary_container_name=container)


def gpu_scheduling() -> tuple[list, dict[str, str] | None]:
    """(tolerations, nodeSelector) of GPU worker pods, from FLYRAY_GPU_TOLERATIONS (a JSON list of
    Kubernetes tolerations; default: tolerate the nvidia.com/gpu taint) and
    FLYRAY_GPU_NODE_SELECTOR (a JSON object of node labels; default: none)."""
    from kubernetes.client import V1Toleration

    fields = {camel: snake for snake, camel in V1Toleration.attribute_map.items()}
    tolerations = _json_setting("FLYRAY_GPU_TOLERATIONS", [GPU_TAINT], list)
    for i, toleration in enumerate(tolerations):
        unknown = set(toleration) - set(fields) if isinstance(toleration, dict) else {"(type)"}
        if unknown:
            raise ValueError(f"FLYRAY_GPU_TOLERATIONS[{i}]: expected a toleration with fields "
                             f"{sorted(fields)}, got {toleration!r}")  # fmt: skip
    selector = _json_setting("FLYRAY_GPU_NODE_SELECTOR", {}, dict)
    if not all(isinstance(v, str) for v in selector.values()):
        raise ValueError(f"FLYRAY_GPU_NODE_SELECTOR: label values must be strings, got {selector}")
    return [V1Toleration(**{fields[k]: v for k, v in t.items()}) for t in tolerations], (
        selector or None
    )


def _json_setting(name: str, default, kind: type):
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}: not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{name}: expected a JSON {kind.__name__}, got {text!r}")
    return value


def storage_secrets() -> list[Secret]:
    """The S3 credentials as Flyte secrets, mounted by Flyte straight into the variables that
    flyray.storage reads (values never pass through flyray's code or logs)."""
    group = os.environ.get("FLYRAY_S3_SECRET_GROUP")
    if not group:
        return []
    return [
        Secret(
            group=group, key=key, env_var=key.upper(), mount_requirement=Secret.MountType.ENV_VAR
        )
        for key in _S3_SECRET_KEYS
    ]


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
    same node finds again (see `checkpoint_uri`), so a retry resumes where the attempt stopped."""
    if ray:
        config = ray if isinstance(ray, DistributedConfig) else None
        task_config = ray_job(config, worker_gpus)
    else:
        task_config = None
    options = {
        "container_image": image,
        "task_config": task_config,
        "retries": retries,
        "timeout": timeout if sizes else timeout * timeout_scale(),
        "interruptible": bool(cache) and not worker_gpus,
        "secret_requests": storage_secrets() if storage and not sizes else [],
        "enable_deck": deck,
        "environment": deployment_environment(),
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


def register(config: RegistryConfig, candidate: Candidate, run_id: str | None = None):
    """flyray.registry.register with the execution's lineage; the decision becomes a deck."""
    tags = execution_tags(candidate.identity.workload)
    registration = registry.register(config, candidate, tags, run_id)
    publish("registry", *registration.deck())
    return registration


def new_output_dir() -> str:
    """A fresh directory under the execution's raw-output prefix (s3:// on a cluster)."""
    return FlyteContextManager.current_context().file_access.get_random_remote_directory()


_ATTEMPT_OUTPUTS = re.compile(r"/([^/]+)/data/\d+/?$")  # <node-id>/data/<attempt>


def checkpoint_uri(config: DistributedConfig, name: str, inputs: dict | None = None) -> str:
    """Where this task's checkpoints go: `config.checkpoint_uri` when set, else a folder that
    every Flyte retry of the same node of the same execution derives alike, so a retry resumes
    from the failed attempt's last checkpoint:
      <root>/<project>/<domain>/<execution>/<node id>/<name>
    root: FLYRAY_CHECKPOINT_ROOT, else `flyray-checkpoints` beside the raw-output prefix (its
    bucket on a cluster). The node id comes from the attempt's output prefix
    (.../<node>/data/<attempt>); where that has no node id (local runs), a digest of the
    task's inputs stands in for it."""
    if config.checkpoint_uri:
        return config.checkpoint_uri
    params = _current_context()
    root = os.environ.get("FLYRAY_CHECKPOINT_ROOT") or _beside(params.raw_output_prefix)
    execution = params.execution_id
    match = _ATTEMPT_OUTPUTS.search(params.output_metadata_prefix or "")
    node = match.group(1) if match else "in-" + _digest(inputs or {})
    parts = (execution.project, execution.domain, execution.name, node, name)
    return posixpath.join(root, *parts) if "://" in root else os.path.join(root, *parts)


def _beside(raw_output_prefix: str) -> str:
    """The bucket of an object-store prefix; locally the folder above Flyte's per-attempt
    <shard>/<attempt id> folders."""
    if "://" in raw_output_prefix:
        scheme, rest = raw_output_prefix.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}/flyray-checkpoints"
    base = os.path.dirname(os.path.dirname(raw_output_prefix.rstrip("/")))
    return os.path.join(base, "flyray-checkpoints")


def _digest(inputs: dict) -> str:
    def plain(value):
        if isinstance(value, StructuredDataset | FlyteDirectory | FlyteFile):
            return uri(value)
        return asdict(value) if is_dataclass(value) else value

    text = json.dumps({k: plain(v) for k, v in inputs.items()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def uri(value: StructuredDataset | FlyteDirectory | FlyteFile) -> str:
    """Where a dataset, directory or file input lives, without downloading it (Ray workers read
    it in place; its literal carries the location)."""
    if isinstance(value, StructuredDataset):
        return value.uri or value.literal.uri
    return value.remote_source or value.path


def publish(name: str, *parts: str) -> None:
    """One Flyte deck tab from HTML fragments (flyray's reports build them), marked with the
    task's name for the local deck index (flyray.ui)."""
    mark = f"<!-- {ui.TASK_MARK} {console.current_task()} -->"
    Deck(name, "\n".join((mark, *parts)))


def execution_tags(workload: str) -> dict[str, str]:
    """Lineage of an MLflow run: the Flyte execution that made it."""
    execution = _current_context().execution_id
    return {
        "flyte.execution_id": execution.name,
        "flyte.project": execution.project,
        "flyte.domain": execution.domain,
        "workload": workload,
    }
