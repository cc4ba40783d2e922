"""A Flyte retry resumes training from the failed attempt's last checkpoint, for every trainer.

Each trainer task runs through `pyflyte-execute`, the entry point a cluster runs, with Flyte's
own layout: attempt N of node n1 writes its outputs to `metadata/<execution>/n1/data/<N>` and its
raw outputs to a shard of its own, `raw/<shard>/<execution>-n1-<N>`. Attempt 0 starts its own
local Ray and is killed with SIGKILL, all of it (task, Ray, every worker: a lost pod), once its
checkpoint folder holds a checkpoint of round/epoch >= 1. Attempt 1, the same node of the
same execution, derives the same folder (tasks/platform.py::checkpoint_uri), must start from
that checkpoint and end as good as an undisturbed run of the same inputs in another execution.
No checkpoint root is configured (FLYRAY_CHECKPOINT_ROOT): the default one, beside the raw
outputs, is used.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flyteidl.core import errors_pb2, literals_pb2
from flytekit import StructuredDataset
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.core.utils import load_proto_from_file, write_proto_to_file
from flytekit.tools.translator import get_serializable
from flytekit.types.directory import FlyteDirectory

import tasks.clip
import tasks.platform
import tasks.recommender
import tasks.tabular
import tasks.vision
from flyray.clip.classifier import RUN_NAME as CLIP_RUN
from flyray.clip.classifier import ClassifierParams
from flyray.clip.embed import embed_folder
from flyray.clip.generate import generate_shapes
from flyray.clip.images import split_embeddings
from flyray.raytrain import DistributedConfig
from flyray.recsys import FunkSVDParams
from flyray.tabular.data import TableConfig, prepare, split_uri, write_breast_cancer
from flyray.tabular.train import RUN_NAME as XGBOOST_RUN
from flyray.tabular.train import XGBParams
from flyray.vision import data as vision_data
from flyray.vision.model import CNNParams
from flyray.vision.train import RUN_NAME as CNN_RUN
from tests.clip_helpers import CLASSES, tiny_clip  # noqa: F401
from tests.conftest import REPO
from tests.test_serialization import SETTINGS

PROJECT, DOMAIN, NODE = "flyray", "development", "n1"
TIMEOUT = 300  # seconds, for any one attempt
QUALITY = 0.02  # relative: the resumed run is as good as the undisturbed one
RESULTS: dict[str, dict] = {}  # per trainer, printed when the module ends


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    if RESULTS:
        print("\nretry resume: attempt 0 killed at its latest checkpoint, attempt 1 started at")
        for name, r in RESULTS.items():
            print(f"  {name:8} checkpoint {r['killed_at']:>3} of {r['total']:>3} -> attempt 1 "
                  f"from {r['resumed_from']:>3}; {r['metric']} resumed {r['resumed']:.4f}, "
                  f"undisturbed {r['undisturbed']:.4f}; {r['seconds']:.0f} s "
                  f"(attempts 0, 1, undisturbed: {r['attempt_seconds']} s)")  # fmt: skip


# ------------------------------------------------------------------------------ one execution


@dataclass
class Execution:
    """One node (n1) of one Flyte execution of `task`, its attempts run by pyflyte-execute."""

    task: object
    inputs: dict
    root: Path  # holds the inputs, metadata/ and raw/ (checkpoints: raw/flyray-checkpoints)
    name: str

    def __post_init__(self) -> None:
        template = get_serializable(OrderedDict(), SETTINGS, self.task).template
        self.args = list(template.container.args)
        self.args[0] = str(Path(sys.executable).parent / self.args[0])  # this venv's
        self.inputs_pb = self.root / f"{self.name}-inputs.pb"
        ctx = FlyteContextManager.current_context()
        literals = TypeEngine.dict_to_literal_map(
            ctx, self.inputs, self.task.python_interface.inputs
        )
        write_proto_to_file(literals.to_flyte_idl(), str(self.inputs_pb))

    def checkpoints(self, name: str) -> Path:
        """The folder every attempt of this node derives for checkpoints called `name`."""
        return self.root / "raw" / "flyray-checkpoints" / PROJECT / DOMAIN / self.name / NODE / name

    def outputs_dir(self, attempt: int) -> Path:
        return self.root / "metadata" / self.name / NODE / "data" / str(attempt)

    def _raw(self, attempt: int) -> Path:
        shard = f"{(zlib.crc32(self.name.encode()) + 7 * attempt) % 256:02x}"  # one per attempt
        return self.root / "raw" / shard / f"{self.name}-{NODE}-{attempt}"

    def _command(self, attempt: int) -> tuple[list[str], dict, Path]:
        raw = self._raw(attempt)
        previous = str(self._raw(attempt - 1) / "_flytecheckpoints") if attempt else ""
        values = {
            "{{.input}}": str(self.inputs_pb),
            "{{.outputPrefix}}": str(self.outputs_dir(attempt)),
            "{{.rawOutputDataPrefix}}": str(raw),
            "{{.checkpointOutputPrefix}}": str(raw / "_flytecheckpoints"),
            "{{.prevCheckpointPrefix}}": previous,
        }
        args = [values.get(a, a) for a in self.args]
        unset = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "FLYRAY_CHECKPOINT_ROOT")
        env = {k: v for k, v in os.environ.items() if k not in unset}
        env.update(
            FLYTE_INTERNAL_EXECUTION_ID=self.name, FLYTE_INTERNAL_EXECUTION_PROJECT=PROJECT,
            FLYTE_INTERNAL_EXECUTION_DOMAIN=DOMAIN, FLYTE_ATTEMPT_NUMBER=str(attempt),
            FLYTE_LOCAL_CACHE_ENABLED="false", FLYRAY_DATA_DIR=str(self.root / "data"),
            RAY_DATA_DISABLE_PROGRESS_BARS="1",
        )  # fmt: skip
        log = self.root / f"{self.name}-{attempt}.log"
        return args, env, log

    @contextlib.contextmanager
    def _attempt(self, attempt: int):
        """Start an attempt as a pod would run it: its own session, so that on leaving, whatever
        is left of it (the task, the Ray it started, every Ray worker) is killed at once."""
        args, env, log = self._command(attempt)
        env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rr-", dir="/tmp")  # short: socket paths
        try:
            with open(log, "wb") as fh:
                proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=fh,
                                        stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            try:
                yield proc, log
            finally:
                _kill_session(proc.pid)
                proc.wait(timeout=30)
        finally:
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)

    def run(self, attempt: int) -> dict:
        """Run one attempt to its end; its outputs as python values."""
        with self._attempt(attempt) as (proc, log):
            try:
                proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{self.name} attempt {attempt} ran over {TIMEOUT} s\n{_tail(log)}")
        out = self.outputs_dir(attempt)
        if (out / "error.pb").exists():
            error = load_proto_from_file(errors_pb2.ErrorDocument, str(out / "error.pb")).error
            pytest.fail(f"{self.name} attempt {attempt} failed: {error.message}\n{_tail(log)}")
        if not (out / "outputs.pb").exists():
            pytest.fail(f"{self.name} attempt {attempt} wrote no outputs\n{_tail(log)}")
        literals = load_proto_from_file(literals_pb2.LiteralMap, str(out / "outputs.pb"))
        return TypeEngine.literal_map_to_kwargs(
            FlyteContextManager.current_context(),
            lm=_literal_map(literals),
            python_types=self.task.python_interface.outputs,
        )

    def kill_after_checkpoint(self, attempt: int, progress: Callable[[], int]) -> None:
        """Start an attempt and SIGKILL all of it (a lost pod) as soon as `progress()`, the
        round/epoch of its latest checkpoint, is >= 1."""
        with self._attempt(attempt) as (proc, log):
            deadline = time.monotonic() + TIMEOUT
            while progress() < 1:
                if proc.poll() is not None:
                    pytest.fail(f"{self.name} attempt {attempt} exited ({proc.returncode}) "
                                f"before a checkpoint\n{_tail(log)}")  # fmt: skip
                if time.monotonic() > deadline:
                    pytest.fail(f"{self.name} attempt {attempt}: no checkpoint in {TIMEOUT} s")
                time.sleep(0.05)
        assert not (self.outputs_dir(attempt) / "outputs.pb").exists()


def _literal_map(proto: literals_pb2.LiteralMap):
    from flytekit.models.literals import LiteralMap

    return LiteralMap.from_flyte_idl(proto)


def _tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _session(sid: int) -> list[int]:
    """Live processes of session `sid` (Ray puts each worker in a process group of its own, so
    the process group of pyflyte-execute is not the whole attempt; its session is)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if int(session) == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _kill_session(sid: int, timeout: float = 30) -> None:
    """SIGKILL every process of the session until none is left, as when a pod is lost."""
    deadline = time.monotonic() + timeout
    while pids := _session(sid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            pytest.fail(f"processes {pids} of the killed attempt are still running")
        time.sleep(0.1)


# ------------------------------------------------------------------------- checkpoint progress


def ray_train_progress(run_dir: Path, step: Callable[[dict], int]) -> Callable[[], int]:
    """Round/epoch of the latest checkpoint Ray Train (V2) registered under `run_dir` (its
    checkpoint-manager snapshot, what a restarted run restores from), from its metrics."""

    def progress() -> int:
        try:
            snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):  # not there yet, or being written
            return 0
        latest = snapshot.get("latest_checkpoint_result")
        if not latest or not (run_dir / latest["checkpoint_dir_name"]).is_dir():
            return 0
        return step(latest["metrics"])

    return progress


def funksvd_progress(folder: Path) -> Callable[[], int]:
    """Epoch named by FunkSVD's latest.json (written after the checkpoint it names)."""

    def progress() -> int:
        try:
            return json.loads((folder / "latest.json").read_text())["epoch"]
        except (OSError, ValueError):
            return 0

    return progress


# ------------------------------------------------------------------------------- the scenario


@dataclass
class Trainer:
    name: str
    task: object
    inputs: dict
    checkpoints: str  # the name the task gives tasks.platform.checkpoint_uri
    progress: Callable[[Path], Callable[[], int]]  # of the checkpoint folder
    total: int  # rounds or epochs a run trains
    resumed_from: Callable[[object], int]  # of the report
    metric: str
    quality: Callable[[object], float]  # of the report


def retry_resumes(trainer: Trainer, root: Path) -> None:
    """Attempt 0 of an execution is lost after a checkpoint, attempt 1 goes on from it and ends
    as good as an undisturbed run of the task on the same inputs (here, in-process)."""
    clock = [time.monotonic()]
    retried = Execution(trainer.task, trainer.inputs, root, f"{trainer.name}-retried")
    progress = trainer.progress(retried.checkpoints(trainer.checkpoints))
    retried.kill_after_checkpoint(0, progress)
    killed_at = progress()  # the latest checkpoint when the pod died
    assert 1 <= killed_at < trainer.total
    clock.append(time.monotonic())
    resumed = retried.run(1)["report"]
    clock.append(time.monotonic())
    baseline = trainer.task(**trainer.inputs).report
    clock.append(time.monotonic())
    RESULTS[trainer.name] = result = {
        "killed_at": killed_at, "total": trainer.total,
        "resumed_from": trainer.resumed_from(resumed), "metric": trainer.metric,
        "resumed": trainer.quality(resumed), "undisturbed": trainer.quality(baseline),
        "seconds": clock[-1] - clock[0],
        "attempt_seconds": [round(b - a) for a, b in itertools.pairwise(clock)],  # 0, 1, undisturbed
    }  # fmt: skip
    print(f"\n{trainer.name}: {result}")
    assert result["resumed_from"] == killed_at  # started where attempt 0 died, not at 0
    assert trainer.resumed_from(baseline) == 0
    assert result["resumed"] == pytest.approx(result["undisturbed"], rel=QUALITY)


@pytest.fixture(autouse=True)
def local_run(tmp_path, monkeypatch, flyte_cache):
    """The undisturbed in-process run: its own data dir and embedded MLflow, a fresh cache."""
    monkeypatch.setenv("FLYRAY_DATA_DIR", str(tmp_path / "local-data"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FLYRAY_CHECKPOINT_ROOT", raising=False)


def config(**kw) -> DistributedConfig:
    return DistributedConfig(**{"min_workers": 0, "max_failures": 0, "checkpoint_every": 1, **kw})


# ---------------------------------------------------------------------------------- trainers


@pytest.mark.slow
def test_xgboost_retry_resumes_from_the_last_checkpoint(tmp_path):
    source = write_breast_cancer(str(tmp_path / "table"), label="target")
    spec = prepare(source, str(tmp_path / "prepared"), TableConfig(label="target"))
    splits = {s: StructuredDataset(uri=split_uri(str(tmp_path / "prepared"), s))
              for s in ("train", "validation")}  # fmt: skip
    params = XGBParams(num_boost_round=30, early_stopping_rounds=0)  # every run trains 30
    inputs = {**splits, "spec": spec, "params": params,
              "config": config(workers=2, checkpoint_every=5)}  # fmt: skip

    def rounds(metrics: dict) -> int:
        return metrics["restored_from_round"] + len(metrics["validation_auc"])

    retry_resumes(Trainer(
        "xgboost", tasks.tabular.fit_xgboost, inputs, "xgboost",
        lambda folder: ray_train_progress(folder / XGBOOST_RUN, rounds), params.num_boost_round,
        lambda report: report.restored_from_round, "validation AUC",
        lambda report: report.validation_auc[-1],
    ), tmp_path)  # fmt: skip


@pytest.mark.slow
def test_funksvd_retry_resumes_from_the_last_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    n_users, n_items, n = 1000, 500, 100_000
    pt, qt = rng.normal(0, 0.6, (n_users, 5)), rng.normal(0, 0.6, (n_items, 5))
    u, i = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    r = np.clip(3.2 + (pt[u] * qt[i]).sum(1) + rng.normal(0, 0.3, n), 1, 5)
    held_out = rng.random(n) < 0.15
    ratings = {}
    for name, rows in (("train", ~held_out), ("validation", held_out)):
        table = pa.table({
            "user_idx": u[rows].astype(np.int32), "item_idx": i[rows].astype(np.int32),
            "rating": r[rows].astype(np.float32), "weight": np.ones(rows.sum(), np.float32),
            "n_events": np.ones(rows.sum(), np.int32),
        })  # fmt: skip
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "part-0.parquet")
        ratings[f"{name}_ratings"] = StructuredDataset(uri=str(tmp_path / name))
    maps = tmp_path / "id_maps"
    maps.mkdir()
    pq.write_table(
        pa.table(
            {"user_idx": np.arange(n_users, dtype=np.int32), "user_id": np.arange(n_users) * 10 + 7}
        ),
        maps / "users.parquet",
    )
    pq.write_table(pa.table({"item_idx": np.arange(n_items, dtype=np.int32),
                             "item_id": np.arange(n_items) + 1000}), maps / "items.parquet")  # fmt: skip
    params = FunkSVDParams(n_factors=16, n_epochs=100, lr=0.01, seed=0)
    inputs = {**ratings, "id_maps": FlyteDirectory(str(maps), remote_directory=False),
              "params": params, "config": config(workers=2)}  # fmt: skip

    retry_resumes(Trainer(
        "funksvd", tasks.recommender.fit_funksvd, inputs, "funksvd", funksvd_progress,
        params.n_epochs, lambda report: report.resumed_from_epoch, "validation RMSE",
        lambda report: report.validation_rmse[-1],
    ), tmp_path)  # fmt: skip


@pytest.mark.slow
def test_cnn_retry_resumes_from_the_last_checkpoint(tmp_path):
    out = str(tmp_path / "digits")
    vision_data.prepare("", out, image_size=16, test_fraction=0.2, seed=0)
    params = CNNParams(epochs=8, global_batch_size=64, learning_rate=3e-3, filters=[8, 16],
                       dense_units=32, dropout=0.1)  # fmt: skip
    inputs = {"train": StructuredDataset(uri=f"{out}/train"),
              "test": StructuredDataset(uri=f"{out}/test"),
              "params": params, "config": config(workers=1)}  # fmt: skip

    def epochs(metrics: dict) -> int:
        return metrics["epochs"][-1]["epoch"]

    retry_resumes(Trainer(
        "cnn", tasks.vision.fit_cnn, inputs, "cnn",
        lambda folder: ray_train_progress(folder / CNN_RUN, epochs), params.epochs,
        lambda report: report.resumed_from_epoch, "test accuracy",
        lambda report: report.test_accuracy,
    ), tmp_path)  # fmt: skip


@pytest.mark.slow
def test_clip_retry_resumes_from_the_last_checkpoint(tmp_path, tiny_clip):  # noqa: F811
    images = tmp_path / "shapes"
    generate_shapes(str(images), classes=CLASSES, per_class=60, seed=1)
    embedded = embed_folder(str(images), tiny_clip, str(tmp_path / "cache"), batch_size=32,
                            in_process=True)  # fmt: skip
    splits = split_embeddings(pq.read_table(embedded.embeddings_uri), 0.2, 0.2, seed=0)
    data = {}
    for name in ("train", "validation"):
        (tmp_path / name).mkdir()
        pq.write_table(getattr(splits, name), tmp_path / name / "part-00000.parquet")
        data[name] = StructuredDataset(uri=str(tmp_path / name))
    params = ClassifierParams(hidden=32, epochs=8, lr=0.005, batch_size=16, seed=0)
    inputs = {**data, "labels": splits.labels, "embedding_model": tiny_clip, "params": params,
              "config": config(workers=1), "experiment": "retry-resume"}  # fmt: skip

    retry_resumes(Trainer(
        "clip", tasks.clip.fit_clip_classifier, inputs, "clip",
        lambda folder: ray_train_progress(folder / CLIP_RUN, lambda m: m["epoch"]),
        params.epochs, lambda report: report.resumed_from_epoch, "validation accuracy",
        lambda report: report.validation_accuracy[-1],
    ), tmp_path)  # fmt: skip
