"""The CLIP workflow's cluster path: tasks, images, Ray job specs, caches, retries, GPUs."""

from __future__ import annotations

import pytest

import images
from tasks.raycluster import ray_job


@pytest.fixture(scope="module")
def tasks(task_templates, launch_plans) -> dict:
    assert "clip_default" in launch_plans
    return task_templates("clip")


def test_every_task_names_the_torch_image(tasks):
    assert set(tasks) == {"resolve_images", "embed_images", "train_clip_classifier",
                          "fit_clip_classifier", "evaluate_clip_classifier",
                          "register_clip_classifier"}  # fmt: skip
    expected = images.clip.image_name()
    assert expected.startswith("localhost:30000/flyray-torch:")
    for name, template in tasks.items():
        assert template.container.image == expected, name


def test_ray_tasks_carry_head_and_worker_groups(tasks):
    ray_tasks = {n: t for n, t in tasks.items() if t.type == "ray" and n != "fit_clip_classifier"}
    # train_clip_classifier sizes fit_clip_classifier's cluster per run (tests/test_platform.py)
    assert set(ray_tasks) == {"embed_images", "evaluate_clip_classifier"}
    assert tasks["fit_clip_classifier"].type == "ray"
    for name, template in ray_tasks.items():
        job = template.custom
        assert job["shutdownAfterJobFinishes"] is True, name
        head = job["rayCluster"]["headGroupSpec"]
        assert head["rayStartParams"] == {"num-cpus": "0"}
        [group] = job["rayCluster"]["workerGroupSpec"]
        assert group["groupName"] == "workers" and group["replicas"] == 2
        [worker] = group["k8sPod"]["podSpec"]["containers"]
        assert worker["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}  # no GPU asked


def test_cache_versions_and_retries(tasks):
    versions = {n: t.metadata.discovery_version for n, t in tasks.items()
                if t.metadata.discoverable}  # fmt: skip
    assert versions == {"embed_images": "clip-embed-1", "fit_clip_classifier": "clip-train-2",
                        "evaluate_clip_classifier": "clip-evaluate-1"}  # fmt: skip
    assert not tasks["resolve_images"].metadata.discoverable  # must see changed images
    assert not tasks["register_clip_classifier"].metadata.discoverable
    assert tasks["train_clip_classifier"].metadata.retries.retries == 2
    assert tasks["register_clip_classifier"].metadata.retries.retries == 2


def test_gpu_workers_when_asked():
    def worker_resources(job):
        [group] = job.worker_node_config
        return group.pod_template.pod_spec.containers[0].resources

    gpu = worker_resources(ray_job(worker_gpus=1))
    assert gpu.requests["nvidia.com/gpu"] == gpu.limits["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in worker_resources(ray_job()).requests
