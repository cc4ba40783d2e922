"""Node loss on a real multi-node Ray cluster (ray.cluster_utils.Cluster: a head and 2 worker
nodes, each its own raylet process). Run in a process of its own, because a test session
already holds one Ray instance:

    python -m tests.node_loss funksvd OUT.json

Trains once undisturbed, then again while a watcher removes a worker node (killing its raylet
and every process on it) as soon as a given checkpoint is written; writes what happened as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
from ray.cluster_utils import Cluster


def _start_cluster() -> tuple[Cluster, list]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, workers


def _kill_when(path: Path, cluster: Cluster, node, killed: dict, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.02)
    if path.exists():
        killed["at"] = time.time()
        cluster.remove_node(node, allow_graceful=False)


class _Resumes(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def funksvd(out: Path) -> None:
    from flyray.recsys import FunkSVDParams
    from flyray.recsys.distributed import DistributedConfig, Ratings, train
    from tests.test_funksvd import synthetic

    df = synthetic(n_users=3000, n_items=1000, n=300_000)
    users, u = np.unique(df.user_id, return_inverse=True)
    items, i = np.unique(df.item_id, return_inverse=True)
    r = df.rating.to_numpy(np.float32)
    cut = 260_000
    train_r, val_r = Ratings(u[:cut], i[:cut], r[:cut]), Ratings(u[cut:], i[cut:], r[cut:])
    params = FunkSVDParams(n_factors=32, n_epochs=20, lr=0.01, reg=0.05, seed=3)
    cluster, nodes = _start_cluster()
    handler = _Resumes()
    logging.getLogger("flyray").addHandler(handler)
    logging.getLogger("flyray").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:

        def fit(name: str):
            config = DistributedConfig(checkpoint_uri=f"{tmp}/{name}", max_restarts=2)
            return train(train_r, len(users), len(items), params, config, val_r, users, items)

        reference = fit("reference")
        killed: dict = {}
        watcher = threading.Thread(
            target=_kill_when,
            args=(Path(tmp) / "disturbed" / "epoch-0006", cluster, nodes[1], killed),
            daemon=True,
        )
        watcher.start()
        disturbed = fit("disturbed")
        watcher.join(timeout=5)
    result = {
        "node_killed": "at" in killed,
        "resumes": [m for m in handler.messages if "resuming from" in m],
        "lost": [m for m in handler.messages if "was lost" in m],
        "log": [m for m in handler.messages if "dsgd:" in m or "worker" in m][:8],
        "epochs": [h.epoch for h in disturbed.history],
        "workers_per_epoch": [len(h.workers) for h in disturbed.history],
        "reference_rmse": reference.history[-1].validation_rmse,
        "disturbed_rmse": disturbed.history[-1].validation_rmse,
    }
    out.write_text(json.dumps(result))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    {"funksvd": funksvd}[sys.argv[1]](Path(sys.argv[2]))
