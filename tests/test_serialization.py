"""The cluster path without a cluster: every workflow and launch plan in workflows/ serializes;
Ray specs, images, cache versions, retries and schedules are what registration would send."""

from __future__ import annotations

import pytest
from flytekit.models.task import TaskSpec

import images


@pytest.fixture(scope="module")
def tasks(task_templates) -> dict:
    """The recommendation workflow's tasks (its data preparation's too)."""
    return task_templates("clickstream", "recommender")


def test_every_workflow_and_launch_plan_serializes(serialized, launch_plans):
    assert {"recommendation_default", "recommendation_nightly"} <= set(launch_plans)
    tasks = [v.template for v in serialized.values() if isinstance(v, TaskSpec)]
    family_images = {s.image_name() for s in (images.recommender, images.tabular, images.image,
                                              images.clip)}  # fmt: skip
    for template in tasks:
        # Every task names its family's image; none falls back to the default flytekit one.
        assert template.container.image in family_images, template.id.name
        if template.type == "ray":
            job = template.custom
            assert job["shutdownAfterJobFinishes"] is True, template.id.name
            assert job["ttlSecondsAfterFinished"] > 0
            assert job["rayCluster"]["workerGroupSpec"], template.id.name


def test_every_task_names_the_recommender_image(tasks):
    assert set(tasks) >= {"resolve_source", "ingest_clickstream", "build_ratings", "train_recommender",
                          "evaluate_model", "register_model", "recommend_users", "data_window"}  # fmt: skip
    expected = images.recommender.image_name()
    assert expected.startswith("localhost:30000/flyray-recommender:")
    for name, template in tasks.items():
        assert template.container.image == expected, name


def test_ray_tasks_carry_head_and_worker_groups(tasks):
    ray_tasks = {n: t for n, t in tasks.items() if t.type == "ray" and n != "fit_recommender"}
    # train_recommender starts fit_recommender on a cluster sized per run (tests/test_platform.py)
    # evaluate_model and recommend_users rank in one process (compiled kernels): no Ray cluster.
    assert set(ray_tasks) == {"ingest_clickstream", "build_ratings", "tune_params"}
    assert tasks["fit_recommender"].type == "ray"
    for name, template in ray_tasks.items():
        job = template.custom
        assert job["shutdownAfterJobFinishes"] is True, name
        assert job["ttlSecondsAfterFinished"] == 600
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
        assert worker["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}


def test_cache_versions_and_retries(tasks):
    versions = {
        n: t.metadata.discovery_version for n, t in tasks.items() if t.metadata.discoverable
    }
    assert versions == {"ingest_clickstream": "ingest-1", "build_ratings": "features-1",
                        "evaluate_model": "evaluate-4", "recommend_users": "recommend-3",
                        "tune_params": "tune-1", "fit_recommender": "train-4"}  # fmt: skip
    assert not tasks["resolve_source"].metadata.discoverable  # it must see content changes
    assert not tasks["register_model"].metadata.discoverable  # one MLflow run per execution
    assert tasks["train_recommender"].metadata.retries.retries == 2
    assert tasks["register_model"].metadata.retries.retries == 2


def test_launch_plans_and_the_nightly_schedule(launch_plans):
    plans = launch_plans
    assert set(plans) >= {"recommendation_default", "recommendation_nightly"}
    schedule = plans["recommendation_nightly"].spec.entity_metadata.schedule
    assert schedule.cron_schedule.schedule == "0 3 * * *"
    assert schedule.kickoff_time_input_arg == "run_date"
    assert plans["recommendation_default"].spec.entity_metadata.schedule is None
    defaults = plans["recommendation_nightly"].spec.default_inputs.parameters
    assert defaults["window_days"].default.scalar.primitive.integer == 30
