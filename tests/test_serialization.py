"""The cluster path without a cluster, for every workload from one serialization (the session's
`serialized` fixture): each workflow's tasks name their family's image; Ray tasks carry a head
and a worker group; trainers are sized per run; cache versions, retries, launch plans and the
nightly schedule are what registration would send."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from flytekit.models.task import Resources, TaskSpec

import images
from tasks.raycluster import ray_job


@dataclass
class Workload:
    modules: tuple[str, ...]
    image: object
    tasks: set[str]
    ray: set[str]  # Ray tasks on a cluster of FLYRAY_RAY_WORKERS pods
    trainer: str  # the Ray trainer that its sizing @dynamic starts on a cluster sized per run
    caches: dict[str, str]
    retried: tuple[str, ...]
    uncached: tuple[str, ...] = ()
    plans: set[str] = field(default_factory=set)


WORKLOADS = {
    "recommendation": Workload(
        ("clickstream", "recommender", "workflows.recommendation"), images.recommender,
        {"resolve_source", "ingest_clickstream", "data_window", "build_ratings", "tune_params",
         "train_recommender", "fit_recommender", "evaluate_model", "register_model",
         "recommend_users", "pipeline_recipe"},
        # evaluate_model and recommend_users rank in one process (compiled kernels): no cluster.
        {"ingest_clickstream", "build_ratings", "tune_params"}, "fit_recommender",
        {"ingest_clickstream": "ingest-2", "build_ratings": "features-2", "tune_params": "tune-1",
         "fit_recommender": "train-4", "evaluate_model": "evaluate-4",
         "recommend_users": "recommend-3"},
        ("train_recommender", "register_model"), ("resolve_source", "register_model"),
        {"recommendation_default", "recommendation_nightly"},
    ),
    "tabular": Workload(
        ("tabular", "workflows.tabular"), images.tabular,
        {"resolve_table", "prepare_table", "train_xgboost", "fit_xgboost", "evaluate_xgboost",
         "register_xgboost", "xgboost_recipe"},
        {"prepare_table"}, "fit_xgboost",
        {"prepare_table": "tabular-prepare-2", "fit_xgboost": "xgboost-train-2",
         "evaluate_xgboost": "xgboost-evaluate-1"},
        ("train_xgboost", "register_xgboost"), ("register_xgboost",), {"xgboost_default"},
    ),
    "vision": Workload(
        ("vision", "workflows.image_classification"), images.image,
        {"resolve_image_source", "prepare_images", "train_baseline", "train_distributed",
         "fit_cnn", "compare_runs", "register_cnn", "cnn_recipe"},
        set(), "fit_cnn", {"prepare_images": "vision-data-2"},  # timings are never replayed
        ("register_cnn",), ("register_cnn",), {"cnn_benchmark_default"},
    ),
    "clip": Workload(
        ("clip", "workflows.clip"), images.clip,
        {"resolve_images", "embed_images", "train_clip_classifier", "fit_clip_classifier",
         "evaluate_clip_classifier", "register_clip_classifier", "clip_recipe"},
        {"embed_images", "evaluate_clip_classifier"}, "fit_clip_classifier",
        {"embed_images": "clip-embed-2", "fit_clip_classifier": "clip-train-2",
         "evaluate_clip_classifier": "clip-evaluate-1"},
        ("train_clip_classifier", "register_clip_classifier"),
        ("resolve_images", "register_clip_classifier"), {"clip_default"},
    ),
}  # fmt: skip


@pytest.fixture(params=list(WORKLOADS))
def workload(request, task_templates) -> tuple[Workload, dict]:
    spec = WORKLOADS[request.param]
    return spec, task_templates(*spec.modules)


def test_every_task_names_its_familys_image(workload):
    spec, tasks = workload
    assert set(tasks) == spec.tasks
    expected = spec.image.image_name()
    assert expected.startswith("localhost:30000/flyray-")
    for name, template in tasks.items():
        assert template.container.image == expected, name


def test_ray_tasks_carry_head_and_worker_groups(workload):
    spec, tasks = workload
    assert {n for n, t in tasks.items() if t.type == "ray"} == spec.ray | {spec.trainer}
    for name in spec.ray:
        job = tasks[name].custom
        assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] == 600
        # No runtime env in the spec: on a cluster the plugin ships the fast-registered code as
        # working_dir at ray.init, and pods take their environment from envFrom (test_k8s).
        assert not job.get("runtimeEnv") and not job.get("runtimeEnvYaml"), name
        head = job["rayCluster"]["headGroupSpec"]
        assert head["rayStartParams"] == {"num-cpus": "0"}  # the head schedules, workers compute
        [head_container] = head["k8sPod"]["podSpec"]["containers"]
        assert head_container["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
        [group] = job["rayCluster"]["workerGroupSpec"]
        assert group["groupName"] == "workers"
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
        [worker] = group["k8sPod"]["podSpec"]["containers"]
        assert worker["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}  # no GPU asked


def test_cache_versions_retries_and_launch_plans(workload, launch_plans):
    spec, tasks = workload
    versions = {n: t.metadata.discovery_version for n, t in tasks.items()
                if t.metadata.discoverable}  # fmt: skip
    assert versions == spec.caches
    for name in spec.uncached:  # must see changed inputs; one MLflow run per execution
        assert not tasks[name].metadata.discoverable, name
    for name in spec.retried:
        assert tasks[name].metadata.retries.retries == 2, name
    assert spec.plans <= set(launch_plans)


def test_every_workflow_and_launch_plan_serializes(serialized):
    family_images = {s.image_name() for s in (images.recommender, images.tabular, images.image,
                                              images.clip)}  # fmt: skip
    templates = [v.template for v in serialized.values() if isinstance(v, TaskSpec)]
    assert {t.id.name.split(".")[-1] for t in templates} == set().union(
        *(w.tasks for w in WORKLOADS.values())
    )
    for template in templates:  # none falls back to flytekit's default image
        assert template.container.image in family_images, template.id.name


def test_the_cnn_baseline_gets_one_ray_workers_budget(task_templates):
    limits = task_templates("vision")["train_baseline"].container.resources.limits
    assert {r.name: r.value for r in limits} == {
        Resources.ResourceName.CPU: "2",
        Resources.ResourceName.MEMORY: "8Gi",
    }
    assert images.image.env["TF_USE_LEGACY_KERAS"] == "1"


def test_gpu_workers_when_asked():
    def worker_resources(job):
        [group] = job.worker_node_config
        return group.pod_template.pod_spec.containers[0].resources

    gpu = worker_resources(ray_job(worker_gpus=1))
    assert gpu.requests["nvidia.com/gpu"] == gpu.limits["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in worker_resources(ray_job()).requests


def test_launch_plans_and_the_nightly_schedule(launch_plans):
    schedule = launch_plans["recommendation_nightly"].spec.entity_metadata.schedule
    assert schedule.cron_schedule.schedule == "0 3 * * *"
    assert schedule.kickoff_time_input_arg == "run_date"
    assert launch_plans["recommendation_default"].spec.entity_metadata.schedule is None
    defaults = launch_plans["recommendation_nightly"].spec.default_inputs.parameters
    assert defaults["window_days"].default.scalar.primitive.integer == 30
