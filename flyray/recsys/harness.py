"""The one Ray actor training harness under DSGD and iALS: checkpoints, resume, restarts.

A trainer hands `fit` the model at epoch 0 and an `attempt(model, start, n_workers, workers,
checkpoints)` that starts its actors (appending their handles to `workers`), trains from
epoch `start + 1` and calls `checkpoint` after each epoch. The harness restores the latest
checkpoint (or the epoch-0 state), sizes the run to what the cluster can place, and when an
actor or its node is lost kills the rest and starts again from the latest checkpoint, up to
`max_failures` times; a run started again on the same folder (a Flyte retry) resumes the same
way. Hand-written rather than Ray Train: both trainers keep their shards resident in
long-lived actors and pass factor blocks between them as object references, which Ray
Train's worker group does not offer.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import numpy as np
import ray
from pyarrow.fs import FileType
from ray.exceptions import ObjectLostError, RayActorError

from flyray import storage
from flyray.raytrain import DistributedConfig, require_ray
from flyray.recsys.model import EpochMetrics, FactorModel

log = logging.getLogger(__name__)

Attempt = Callable[[FactorModel, int, int, list, "Checkpoints"], None]


class Checkpoints:
    """epoch-NNNN/{model.npz, state.json} under a folder; latest.json names the newest."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = storage.filesystem(uri)

    def save(self, epoch: int, arrays: dict, state: dict) -> None:
        folder = f"{self.path}/epoch-{epoch:04d}"
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        storage.write_atomic(self.fs, f"{folder}/model.npz", buf.getvalue())
        storage.write_atomic(self.fs, f"{folder}/state.json", json.dumps(state).encode())
        # Written last: a checkpoint interrupted before this line is never resumed from.
        storage.write_atomic(
            self.fs, f"{self.path}/latest.json", json.dumps({"epoch": epoch}).encode()
        )

    def latest(self) -> tuple[dict, dict] | None:
        if self.fs.get_file_info(f"{self.path}/latest.json").type != FileType.File:
            return None
        with self.fs.open_input_stream(f"{self.path}/latest.json") as fh:
            epoch = json.loads(fh.read())["epoch"]
        folder = f"{self.path}/epoch-{epoch:04d}"
        with self.fs.open_input_stream(f"{folder}/state.json") as fh:
            state = json.loads(fh.read())
        with self.fs.open_input_stream(f"{folder}/model.npz") as fh:
            arrays = dict(np.load(io.BytesIO(fh.read()), allow_pickle=False))
        return arrays, state


def _signature(trainer: dict) -> dict:
    """What must match for a checkpoint to be resumed: training longer is a resume."""
    return {"name": trainer.get("name"), **trainer.get("params", {}), "n_epochs": None}


def checkpoint(model: FactorModel, epoch: int, n_epochs: int, config: DistributedConfig,
               checkpoints: Checkpoints, gather: Callable[[], None], arrays: tuple[str, ...]
               ) -> bool:  # fmt: skip
    """When due (every `checkpoint_every` epochs and the last) gather the actors' blocks into
    the model and save its `arrays` at `epoch`. Returns whether it saved."""
    if epoch % config.checkpoint_every and epoch != n_epochs:
        return False
    gather()
    state = {
        "epoch": epoch,
        "trainer": model.trainer,
        "history": [asdict(m) for m in model.history],
    }
    checkpoints.save(epoch, {name: getattr(model, name) for name in arrays}, state)
    return True


def _restore(model: FactorModel, initial: dict, checkpoints: Checkpoints) -> int:
    """Set the model to the latest checkpoint (or its epoch-0 state); the epoch reached."""
    for name, value in initial.items():
        setattr(model, name, value.copy())
    model.history = []
    saved = checkpoints.latest()
    if saved is None:
        return 0
    arrays, state = saved
    shapes = all(arrays[n].shape == v.shape for n, v in initial.items() if n in arrays)
    if _signature(state.get("trainer", {})) != _signature(model.trainer) or not shapes:
        raise ValueError(
            f"checkpoint in {checkpoints.uri} was written by a different training "
            f"({state.get('trainer')}); use a new checkpoint_uri or the same settings"
        )
    for name in initial:
        setattr(model, name, arrays[name])
    model.history = [EpochMetrics(**m) for m in state["history"]]
    log.info("%s resuming from %s at epoch %d", model.name, checkpoints.uri, state["epoch"])
    return int(state["epoch"])


def worker_count(config: DistributedConfig) -> int:
    """`workers`, or when elastic as many as the free CPUs hold now, at least `min_workers`:
    a run that lost a node goes on with what is left instead of waiting for a replacement."""
    count = config.worker_count()
    if isinstance(count, int):
        return count
    fit = int(ray.available_resources().get("CPU", 0) // config.cpus_per_worker)
    return max(count[0], min(count[1], fit))


def started(workers: list, cpus_per_worker: int, timeout: float = 120.0) -> None:
    """Wait until every actor runs; a cluster short of CPUs is an error, not a hang."""
    try:
        ray.get([w.__ray_ready__.remote() for w in workers], timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(
            f"{len(workers)} training workers need {len(workers) * cpus_per_worker} free CPUs; "
            f"the Ray cluster has {ray.available_resources().get('CPU', 0):g} free of "
            f"{ray.cluster_resources().get('CPU', 0):g}. Set workers lower or add Ray nodes."
        ) from None


def _stop(workers: list, free_before: float, timeout: float = 10.0) -> None:
    """Kill the actors and wait until their CPUs show as free again, so that a restart or the
    next training sizes itself on the real cluster (CPUs of a lost node never come back)."""
    for w in workers:
        ray.kill(w)
    deadline = time.monotonic() + timeout
    while workers and time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= free_before:
            return
        time.sleep(0.05)


def fit(model: FactorModel, attempt: Attempt, config: DistributedConfig,
        arrays: tuple[str, ...] = ("P", "Q", "bu", "bi")) -> FactorModel:  # fmt: skip
    """Train `model` (at epoch 0) by `attempt` with checkpoints of `arrays` under
    `config.checkpoint_uri` (a temporary folder for this call when empty), resumed from when
    one exists, restarted from the latest after a lost actor."""
    require_ray()
    if model.seen_indptr[-1] == 0:
        raise ValueError("no training ratings")
    if not config.checkpoint_uri:
        with tempfile.TemporaryDirectory(prefix=f"{model.name}-") as folder:
            return fit(model, attempt, replace(config, checkpoint_uri=folder), arrays)
    checkpoints = Checkpoints(config.checkpoint_uri)
    initial = {name: getattr(model, name).copy() for name in arrays}
    for n in range(config.max_failures + 1):
        free = ray.available_resources().get("CPU", 0)
        start = _restore(model, initial, checkpoints)
        if n == 0:
            model.resumed_from_epoch = start  # a Flyte retry of a lost attempt
        workers: list = []
        try:
            attempt(model, start, worker_count(config), workers, checkpoints)
            return model
        except (RayActorError, ObjectLostError) as exc:  # an actor or its node is gone
            if n == config.max_failures:
                raise
            log.warning("a %s worker was lost (%s); resuming from the last checkpoint",
                        model.name, exc)  # fmt: skip
        finally:
            _stop(workers, free)
    raise AssertionError("unreachable")


def block_rows(counts: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(block of each row, index inside its block, rows of each block): d blocks with
    near-equal counts, rows dealt out in a snake order by decreasing count (deterministic)."""
    order = np.argsort(-counts, kind="stable")
    lap = np.arange(len(counts)) % (2 * d)
    deal = np.where(lap < d, lap, 2 * d - 1 - lap)
    blocks = np.empty(len(counts), np.int32)
    blocks[order] = deal
    members = [np.flatnonzero(blocks == b) for b in range(d)]
    local = np.empty(len(blocks), np.int32)
    for rows in members:
        local[rows] = np.arange(len(rows), dtype=np.int32)
    return blocks, local, members


def node() -> str:
    """The short id of the node this actor runs on (per-worker logs say where work went)."""
    return ray.get_runtime_context().get_node_id()[:8]
