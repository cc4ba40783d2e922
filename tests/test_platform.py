"""The one platform layer under the four workloads: every task carries the same preamble
(image, timeout, retries, secrets when it touches storage), training tasks ask for a Ray cluster
sized by the run's DistributedConfig, and checkpoint folders survive Flyte retries."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from collections import OrderedDict
from datetime import timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flytekit.core.base_task import PythonTask
from flytekit.core.context_manager import ExecutionParameters, ExecutionState, FlyteContextManager
from flytekit.core.python_function_task import PythonFunctionTask
from flytekit.core.type_engine import TypeEngine
from flytekit.models.core.identifier import WorkflowExecutionIdentifier
from flytekit.tools.translator import get_serializable

import tasks
from flyray.raytrain import DistributedConfig
from k8s import check
from tasks.deployment import Deployment
from tasks.outputs import checkpoint_uri
from tasks.raycluster import worker_pods
from tests.conftest import REPO

# Tasks that touch no object storage, so they request no secret.
STORAGE_FREE = {"data_window", "compare_runs"}


def all_tasks() -> dict[str, PythonTask]:
    """Every task defined in tasks/ (what registration finds, dynamic ones' inner tasks too)."""
    found = {}
    for info in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, PythonTask) and obj.name.startswith("tasks."):
                found[obj.name.split(".")[-1]] = obj
    return found


def _is_dynamic(task: PythonTask) -> bool:
    return task.execution_mode == PythonFunctionTask.ExecutionBehavior.DYNAMIC


def _template(task: PythonTask):
    return get_serializable(OrderedDict(), check.serialization_settings(), task).template


def test_every_task_has_the_preamble():
    found = all_tasks()
    assert len(found) >= 28
    trainers = {"fit_recommender", "fit_xgboost", "fit_cnn", "fit_clip_classifier"}
    assert trainers <= set(found)
    for name, task in found.items():
        meta = _template(task).metadata
        # Sized per task (docs/configuration.md, checked in tests/test_k8s.py); none unbounded.
        assert timedelta(0) < meta.timeout <= timedelta(hours=5), name
        assert meta.retries.retries >= 1, name
        assert task.container_image is not None, name


def test_every_task_that_touches_storage_requests_the_secrets():
    """Secret requests are read at registration: serialize with the secret group set."""
    code = (
        "import json, tests.test_platform as p\n"
        "print(json.dumps({n: [[(s.group, s.key, s.env_var) for s in t.security_context.secrets]"
        " if t.security_context else [], t.environment] for n, t in p.all_tasks().items()}))"
    )
    facts = {"FLYRAY_S3_SECRET_GROUP": "s3creds", "FLYRAY_RAY_WORKER_CPU": "8",
             "FLYRAY_CHECKPOINT_ROOT": "s3://ckpt"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**facts, "PATH": "/bin"},
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    found = json.loads(out.stdout.strip().splitlines()[-1])
    secrets = {name: requested for name, (requested, _) in found.items()}
    # Every task carries the deployment facts it was registered with, so the dynamic that sizes
    # a trainer's cluster at run time reads those, not the defaults of its own pod.
    # ... and the code registered, for every version's lineage (flyray.lineage)
    code = {env.pop("FLYRAY_CODE_VERSION") for _, env in found.values()}
    assert len(code) == 1 and len(code.pop().removesuffix("+dirty")) == 40
    assert all(environment == facts for _, environment in found.values())
    sizers = {n for n, t in all_tasks().items() if _is_dynamic(t)}
    assert len(sizers) == 4
    registers = {n for n in secrets if n.startswith("register_")}
    assert len(registers) == 4
    gate = [["flyray-mlflow-gate", "password", None], ["flyray-mlflow-gate", "username", None]]
    for name, requested in secrets.items():
        if name in STORAGE_FREE | sizers:
            assert requested == [], name
            continue
        # mounted by Flyte as the variables flyray.storage reads; the gate's identity only where
        # the champion gate runs (files, read through flytekit's secrets by tasks.outputs)
        storage = [
            ["s3creds", "aws_access_key_id", "AWS_ACCESS_KEY_ID"],
            ["s3creds", "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"],
        ]
        assert sorted(requested) == sorted(storage + (gate if name in registers else [])), name


def _compile_dynamic(task: PythonTask, **inputs):
    """What a dynamic task yields at run time on a cluster (one run per process there, so the
    workflow flytekit compiles and keeps for the task is dropped first): its DynamicJobSpec."""
    task._wf = None
    ctx = FlyteContextManager.current_context()
    params = ExecutionParameters(
        execution_date=None, tmp_dir="/tmp", stats=None, logging=None, checkpoint=None,
        raw_output_prefix=ctx.file_access.raw_output_prefix,
        execution_id=WorkflowExecutionIdentifier("flyray", "development", "exec"),
    )  # fmt: skip
    with FlyteContextManager.with_context(
        ctx.with_serialization_settings(check.serialization_settings()).with_execution_state(
            ctx.new_execution_state().with_params(
                mode=ExecutionState.Mode.TASK_EXECUTION, user_space_params=params
            )
        )  # fmt: skip
    ) as ctx:
        literals = TypeEngine.dict_to_literal_map(ctx, inputs, task.python_interface.inputs)
        return task.dispatch_execute(ctx, literals)


@pytest.mark.parametrize("workers,cpus,least,most", [(2, 1, 1, 1), (5, 1, 1, 3), (8, 2, 1, 8)])
def test_the_cluster_follows_the_runs_worker_count(workers, cpus, least, most, tmp_path):
    """One knob: DistributedConfig.workers sizes the trainer and the Ray cluster it runs on
    (2-CPU worker pods by default), autoscaling between min_workers' and workers' pods."""
    from flytekit import StructuredDataset

    import tasks.tabular as tab
    from flyray.tabular.data import TableSpec
    from flyray.tabular.train import XGBParams

    config = DistributedConfig(workers=workers, cpus_per_worker=cpus, min_workers=1)
    assert worker_pods(config) == (least, most)
    spec = TableSpec("s", 1, "y", ["0", "1"], ["a"], {}, 10, 0, {"train": 10}, 0.5)
    split = tmp_path / "split"
    split.mkdir()
    pq.write_table(pa.table({"a": [1.0]}), split / "part-0.parquet")
    data = StructuredDataset(uri=str(split))
    job = _compile_dynamic(tab.train_xgboost, train=data, validation=data, spec=spec,
                           params=XGBParams(), config=config)  # fmt: skip
    [template] = [t for t in job.tasks if t.id.name.endswith("fit_xgboost")]
    cluster = template.custom["rayCluster"]
    [group] = cluster["workerGroupSpec"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (most, least, most)
    assert cluster.get("enableAutoscaling", False) == (least < most)


def test_gpu_pods_hold_one_worker_per_gpu():
    config = DistributedConfig(workers=4, min_workers=2)
    assert worker_pods(config) == (1, 2)  # two 1-CPU workers per 2-CPU pod
    assert worker_pods(config, worker_gpus=1) == (2, 4)  # but one GPU each


def test_every_trainer_is_sized_per_run():
    found = all_tasks()
    for sizer, trainer in [("train_xgboost", "fit_xgboost"), ("train_recommender", "fit_recommender"),
                           ("train_distributed", "fit_cnn"),
                           ("train_clip_classifier", "fit_clip_classifier")]:  # fmt: skip
        assert _is_dynamic(found[sizer]) and found[trainer].task_type == "ray"
        assert "config" in found[trainer].python_interface.inputs
        assert found[trainer].python_interface.inputs["config"] is DistributedConfig


def _in_attempt(monkeypatch, tmp_path, attempt: int, execution: str = "f3a9") -> str:
    """checkpoint_uri as it is derived in one attempt of node n2 (Flyte's prefixes)."""
    params = ExecutionParameters(
        execution_date=None, tmp_dir=str(tmp_path), stats=None, logging=None, checkpoint=None,
        raw_output_prefix=str(tmp_path / "raw" / f"s{attempt}" / f"{execution}-n2-{attempt}"),
        output_metadata_prefix=f"s3://meta/{execution}/n2/data/{attempt}",
        execution_id=WorkflowExecutionIdentifier("flyray", "development", execution),
    )  # fmt: skip
    monkeypatch.setattr("tasks.outputs._current_context", lambda: params)
    return checkpoint_uri(DistributedConfig(), "xgboost", {"x": 1})


def test_checkpoints_are_found_again_by_a_retry(monkeypatch, tmp_path):
    monkeypatch.setattr("tasks.outputs.current", Deployment)
    first, retry = (_in_attempt(monkeypatch, tmp_path, n) for n in (0, 1))
    assert first == retry == str(
        tmp_path / "raw" / "flyray-checkpoints" / "flyray" / "development" / "f3a9" / "n2"
        / "xgboost"
    )  # fmt: skip
    assert _in_attempt(monkeypatch, tmp_path, 0, execution="other") != first
    monkeypatch.setattr(
        "tasks.outputs.current", lambda: Deployment(checkpoint_root="s3://ckpt/root")
    )
    assert _in_attempt(monkeypatch, tmp_path, 3) == (
        "s3://ckpt/root/flyray/development/f3a9/n2/xgboost"
    )
    given = DistributedConfig(checkpoint_uri="s3://mine/ckpt")
    assert checkpoint_uri(given, "xgboost") == "s3://mine/ckpt"


def test_only_the_library_is_installed_as_a_package():
    """tasks/, workflows/ and images/ stay the repository's folders: installing flyray puts no
    `tasks` or `images` into site-packages where another project's would collide."""
    import importlib.metadata

    top_level = importlib.metadata.distribution("flyray").read_text("top_level.txt").split()
    assert top_level == ["flyray"]
    outside = subprocess.run(
        [sys.executable, "-c", "import tasks"], cwd="/", capture_output=True, text=True
    )
    assert "No module named 'tasks'" in outside.stderr
