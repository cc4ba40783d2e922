"""Node loss on a real multi-node Ray cluster (ray.cluster_utils.Cluster: a head with no CPUs
and 2 one-CPU worker nodes, each its own raylet process). Run in a process of its own, because
a test session already holds one Ray instance:

    python -m tests.node_loss funksvd|xgboost|torch OUT.json

Each scenario trains once undisturbed, then again while a watcher removes a worker node
(killing its raylet and every process on it) as soon as a given checkpoint has been written,
and writes what happened as JSON. Each carries on with the worker left (FunkSVD's dsgd by
design, XGBoost and the Torch classifier as elastic Ray Train runs); no replacement node joins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
from ray.cluster_utils import Cluster


class _Disturber:
    """Owns the cluster: a head with no CPUs and two one-CPU worker nodes."""

    def __init__(self) -> None:
        # A killed raylet is declared dead after 3 failed health checks 0.5 s apart, not 5 of
        # 3 s (Ray's defaults, for real networks); what follows is the same, only sooner.
        checks = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                  "health_check_initial_delay_ms": 1000}  # fmt: skip
        for attempt in range(3):
            self.cluster = Cluster()
            try:
                self.cluster.add_node(num_cpus=0, _system_config=checks)  # the head
                self.nodes = [self.cluster.add_node(num_cpus=1) for _ in range(2)]
                break
            except Exception as exc:
                # Ray gives a node a fixed 30 s to register, which a loaded 2-core machine has
                # missed: clear what the failed start left running and start again.
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
                self.cluster.shutdown()
                _kill_children()
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False)
        self.killed_after: float | None = None  # seconds into the disturbed run
        self.seconds: dict[str, float] = {}

    def reference(self, fit: Callable[[], object]):
        began = time.perf_counter()
        result = fit()
        self.seconds["reference"] = time.perf_counter() - began
        return result

    def disturbed(self, fit: Callable[[], object], ready: Callable[[], bool]):
        """`fit()` in a thread while this (main) thread removes node 2 once `ready()` (Ray's
        cluster utilities work only from the main thread)."""
        done: dict = {}
        began = time.perf_counter()

        def run() -> None:
            try:
                done["result"] = fit()
            except BaseException as exc:  # re-raised in the main thread
                done["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        while thread.is_alive() and not ready():
            time.sleep(0.02)
        if thread.is_alive():
            self.cluster.remove_node(self.nodes[1], allow_graceful=False)
            self.killed_after = time.perf_counter() - began
        thread.join()
        self.seconds["disturbed"] = time.perf_counter() - began
        if "error" in done:
            raise done["error"]
        return done["result"]

    def close(self, out: Path, result: dict) -> None:
        out.write_text(json.dumps({"killed_after": self.killed_after, "seconds": self.seconds,
                                   **result}))  # fmt: skip
        ray.shutdown()
        self.cluster.shutdown()


def _kill_children() -> None:
    """This process's children: the GCS, raylets and agents of a node that failed to start
    (Ray keeps no handle on them when its Node constructor raises)."""
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # gone meanwhile
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                os.kill(int(stat.parent.name), signal.SIGKILL)


def _checkpoints_seen(folder: Path, n: int) -> Callable[[], bool]:
    """True once the run's controller has registered `n` distinct checkpoints, as it records
    them in checkpoint_manager_snapshot.json (counted as they come: only the newest 2 are kept).
    A checkpoint folder on disk is not enough: killed before its registration, the run starts
    again from nothing (seen on a loaded CI machine)."""
    seen: set[str] = set()

    def ready() -> bool:
        for snapshot in folder.glob("*/checkpoint_manager_snapshot.json"):
            with contextlib.suppress(OSError, ValueError):  # being written
                state = json.loads(snapshot.read_text())
                seen.update(r["checkpoint_dir_name"] for r in state["checkpoint_results"])
        return len(seen) >= n

    return ready


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def funksvd(out: Path, tmp: Path) -> None:
    from flyray.raytrain import DistributedConfig
    from flyray.recsys import FunkSVDParams
    from flyray.recsys.distributed import train
    from flyray.recsys.model import Ratings
    from tests.test_funksvd import synthetic

    df = synthetic(n_users=3000, n_items=1000, n=300_000)
    users, u = np.unique(df.user_id, return_inverse=True)
    items, i = np.unique(df.item_id, return_inverse=True)
    r = df.rating.to_numpy(np.float32)
    cut = 260_000
    train_r, val_r = Ratings(u[:cut], i[:cut], r[:cut]), Ratings(u[cut:], i[cut:], r[cut:])
    params = FunkSVDParams(n_factors=32, n_epochs=20, lr=0.01, reg=0.05, seed=3)
    disturber = _Disturber()
    handler = _Messages()
    logging.getLogger("flyray").addHandler(handler)
    logging.getLogger("flyray").setLevel(logging.INFO)

    def fit(name: str):
        config = DistributedConfig(checkpoint_uri=f"{tmp}/{name}", max_failures=2)
        return train(train_r, len(users), len(items), params, config, val_r, users, items)

    reference = disturber.reference(lambda: fit("reference"))
    disturbed = disturber.disturbed(
        lambda: fit("disturbed"), (tmp / "disturbed" / "epoch-0006").exists
    )
    disturber.close(out, {
        "resumes": [m for m in handler.messages if "resuming from" in m],
        "lost": [m for m in handler.messages if "was lost" in m],
        "epochs": [h.epoch for h in disturbed.history],
        "workers_per_epoch": [len(h.workers) for h in disturbed.history],
        "reference": reference.history[-1].validation_rmse,
        "disturbed": disturbed.history[-1].validation_rmse,
    })  # fmt: skip


def xgboost(out: Path, tmp: Path) -> None:
    from flyray.raytrain import DistributedConfig
    from flyray.tabular.data import prepare, read_split, split_uri
    from flyray.tabular.evaluate import evaluate
    from flyray.tabular.generate import generate_table
    from flyray.tabular.train import XGBParams, predict, train_distributed

    disturber = _Disturber()
    spec = prepare(generate_table(str(tmp / "table.parquet"), 60_000, 20), str(tmp / "prepared"))
    x_test, y_test = read_split(split_uri(str(tmp / "prepared"), "test"), spec)
    params = XGBParams(num_boost_round=60, max_depth=8, early_stopping_rounds=0)

    def fit(name: str):
        config = DistributedConfig(checkpoint_every=10, checkpoint_uri=str(tmp / name))
        booster, report = train_distributed(
            split_uri(str(tmp / "prepared"), "train"),
            split_uri(str(tmp / "prepared"), "validation"), spec, params, config,
        )  # fmt: skip
        return report, evaluate(predict(booster, spec, x_test), y_test, name).auc

    (reference, reference_auc) = disturber.reference(lambda: fit("reference"))
    (disturbed, disturbed_auc) = disturber.disturbed(
        lambda: fit("disturbed"), _checkpoints_seen(tmp / "disturbed", 3)
    )
    disturber.close(out, {
        "restored_from": disturbed.restored_from_round,
        "rounds": [reference.rounds, disturbed.rounds],
        "workers": [reference.workers, disturbed.workers],
        "reference": reference_auc,
        "disturbed": disturbed_auc,
    })  # fmt: skip


def torch(out: Path, tmp: Path) -> None:
    import pyarrow as pa

    from flyray.clip.classifier import ClassifierParams, train_classifier
    from flyray.raytrain import DistributedConfig

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (6, 64)).astype(np.float32)

    def blobs(n: int) -> pa.Table:
        y = rng.integers(0, len(centres), n)
        x = centres[y] + rng.normal(0, 2.5, (n, 64)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64)
        return pa.table({"embedding": emb, "label_idx": pa.array(y, pa.int64())})

    train, validation = blobs(6000), blobs(2000)
    labels = [f"class_{k}" for k in range(len(centres))]
    params = ClassifierParams(hidden=64, lr=3e-3, epochs=4, batch_size=128, seed=1)
    disturber = _Disturber()

    def fit(name: str):
        config = DistributedConfig(workers=2, max_failures=2, checkpoint_uri=str(tmp / name))
        return train_classifier(train, validation, labels, "synthetic", params, config)

    reference = disturber.reference(lambda: fit("reference"))
    disturbed = disturber.disturbed(
        lambda: fit("disturbed"), _checkpoints_seen(tmp / "disturbed", 2)
    )
    disturber.close(out, {
        "restored_from": disturbed.resumed_from_epoch,
        "epochs": [h.epoch for h in disturbed.history],
        "workers": [reference.workers, disturbed.workers],
        "reference": reference.history[-1].validation_accuracy,
        "disturbed": disturbed.history[-1].validation_accuracy,
    })  # fmt: skip


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        {"funksvd": funksvd, "xgboost": xgboost, "torch": torch}[sys.argv[1]](
            Path(sys.argv[2]), Path(folder)
        )
