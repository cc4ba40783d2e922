"""The Ray cluster a task gets: one per task execution (a KubeRay RayJob on a cluster), its head
and worker pods sized by the deployment or by the run's DistributedConfig."""

from __future__ import annotations

import math

from flytekit import PodTemplate, Resources
from flytekit.core.resources import pod_spec_from_resources
from flytekitplugins.ray import HeadNodeConfig, RayJobConfig, WorkerNodeConfig

from flyray.raytrain import DistributedConfig
from tasks.deployment import Deployment, current

# The `flytekit` user of ImageSpec images; numeric so that runAsNonRoot can be verified.
RUN_AS_USER = 1000


def worker_pods(
    config: DistributedConfig, worker_gpus: int = 0, deploy: Deployment | None = None
) -> tuple[int, int]:
    """(min, max) Ray worker pods that place `config`'s training workers: each pod has the
    deployment's worker CPUs (and `worker_gpus` GPUs), each worker reserves `cpus_per_worker`
    (and one GPU when the pods have GPUs)."""
    deploy = deploy or current()
    per_pod = max(1, int(float(deploy.ray_worker_cpu) // config.cpus_per_worker))
    if worker_gpus:
        per_pod = min(per_pod, worker_gpus)
    most = math.ceil(config.workers / per_pod)
    least = (
        math.ceil(config.min_workers / per_pod) if 0 < config.min_workers < config.workers else most
    )
    return least, most


def ray_job(
    config: DistributedConfig | None = None, worker_gpus: int = 0, deploy: Deployment | None = None
) -> RayJobConfig:
    """One Ray cluster per task execution: a head (schedules only) and one worker group, torn down
    afterwards. Sized by a run's DistributedConfig when given (autoscaling between its min and
    max), else by the deployment's ray_workers. `worker_gpus` > 0 gives each worker pod that
    many GPUs."""
    deploy = deploy or current()
    if config is None:
        least = most = deploy.ray_workers
    else:
        least, most = worker_pods(config, worker_gpus, deploy)
    worker_res = Resources(
        cpu=deploy.ray_worker_cpu, mem=deploy.ray_worker_mem, gpu=worker_gpus or None
    )
    head_res = Resources(cpu=deploy.ray_head_cpu, mem=deploy.ray_head_mem)
    return RayJobConfig(
        head_node_config=HeadNodeConfig(
            ray_start_params={"num-cpus": "0"} if most else None,
            pod_template=_ray_pod("ray-head", head_res, deploy),
        ),
        worker_node_config=[
            WorkerNodeConfig(
                group_name="workers",
                replicas=most,
                min_replicas=least,
                max_replicas=most,
                pod_template=_ray_pod("ray-worker", worker_res, deploy, gpu=bool(worker_gpus)),
            )
        ],
        enable_autoscaling=least < most,
        shutdown_after_job_finishes=True,
        ttl_seconds_after_finished=600,
    )


# A task's or Ray pod's writable folders (emptyDirs) on its read-only root filesystem, and what
# is sent there: HOME (a non-root user without a passwd entry gets "/"), and numba's cache
# (`cache=True` kernels fail to compile, "no locator available", where the code's folder is
# read-only). The default PodTemplate of task pods (k8s/helm/flyte-binary.values.yaml) mounts
# and sets the same.
WRITABLE = {"tmp": "/tmp", "home": "/root"}
WRITABLE_ENV = {"HOME": "/root", "NUMBA_CACHE_DIR": "/tmp/numba-cache"}


def _ray_pod(container: str, resources: Resources, deploy: Deployment, gpu: bool = False
             ) -> PodTemplate:  # fmt: skip
    """A Ray head or worker pod: fixed resources, non-root, environment from the ConfigMap and
    Secret of k8s/ (both optional, so a cluster without them still starts); a GPU pod takes the
    deployment's GPU tolerations and node selector (`gpu_scheduling`)."""
    from kubernetes.client import (
        V1Capabilities,
        V1ConfigMapEnvSource,
        V1EmptyDirVolumeSource,
        V1EnvFromSource,
        V1EnvVar,
        V1PodSecurityContext,
        V1SeccompProfile,
        V1SecretEnvSource,
        V1SecurityContext,
        V1Volume,
        V1VolumeMount,
    )

    spec = pod_spec_from_resources(container, requests=resources, limits=resources)
    spec.automount_service_account_token = False  # Ray pods never call the Kubernetes API
    spec.security_context = V1PodSecurityContext(
        run_as_non_root=True, run_as_user=RUN_AS_USER, fs_group=RUN_AS_USER,
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
    )  # fmt: skip
    [primary] = spec.containers
    primary.security_context = V1SecurityContext(
        allow_privilege_escalation=False, capabilities=V1Capabilities(drop=["ALL"]),
        read_only_root_filesystem=True,
    )  # fmt: skip
    # The image stays read-only; what a pod writes goes to emptyDirs: /tmp (Ray's session,
    # runtime envs, numba's cache) and /root (where fast registration unpacks the code; HOME).
    spec.volumes = [V1Volume(name=n, empty_dir=V1EmptyDirVolumeSource()) for n in WRITABLE]
    primary.volume_mounts = [V1VolumeMount(name=n, mount_path=p) for n, p in WRITABLE.items()]
    primary.env = [V1EnvVar(name=k, value=v) for k, v in WRITABLE_ENV.items()]
    primary.env_from = [
        V1EnvFromSource(config_map_ref=V1ConfigMapEnvSource(name=deploy.k8s_configmap,
                                                            optional=True)),
        V1EnvFromSource(secret_ref=V1SecretEnvSource(name=deploy.k8s_secret, optional=True)),
        V1EnvFromSource(secret_ref=V1SecretEnvSource(name=deploy.k8s_mlflow_secret,
                                                     optional=True)),
    ]  # fmt: skip
    if gpu:
        spec.tolerations, spec.node_selector = gpu_scheduling(deploy)
    return PodTemplate(pod_spec=spec, primary_container_name=container)


def gpu_scheduling(deploy: Deployment | None = None) -> tuple[list, dict[str, str] | None]:
    """(tolerations, nodeSelector) of GPU worker pods: the deployment's FLYRAY_GPU_TOLERATIONS
    (default: tolerate the nvidia.com/gpu taint) and FLYRAY_GPU_NODE_SELECTOR (default none)."""
    from kubernetes.client import V1Toleration

    deploy = deploy or current()
    fields = {camel: snake for snake, camel in V1Toleration.attribute_map.items()}
    tolerations = [V1Toleration(**{fields[k]: v for k, v in t.items()})
                   for t in deploy.gpu_tolerations]  # fmt: skip
    return tolerations, dict(deploy.gpu_node_selector) or None
