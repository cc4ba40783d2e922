"""FunkSVD trained over Ray workers by stratified SGD (DSGD, after Gemulla et al., KDD 2011).

Users and items are cut into d blocks each, balanced by rating count, giving a d x d grid of
rating shards. Worker w keeps user block w (its rows of P and b_u) and the shards (w, 0..d-1)
resident. In sub-epoch s worker w updates item block (w + s) mod d: the d workers touch disjoint
rows of P and Q, so they run in parallel with no locks and no averaging, and every update is an
exact SGD step. Item blocks (rows of Q and b_i) then move to the next worker as Ray object
references, never through the driver. The visiting order inside a shard depends only on (seed,
epoch, shard), so a run is deterministic for a seed, whatever the timing. (The original
system's gradient averaging lives on in bench/gradient_averaging.py, for comparison only.)

The run takes flyray.raytrain's DistributedConfig: `workers` actors of `cpus_per_worker` CPUs,
a checkpoint every `checkpoint_every` epochs to `checkpoint_uri` (local or s3://; "": a
temporary folder for this call), resumed from when started again on the same folder. A lost
worker restarts the run from the latest checkpoint, up to `max_failures` times, on as many
workers as the cluster can place then (at least `min_workers`).
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import ray
from ray.exceptions import ObjectLostError, RayActorError

from flyray import console, storage
from flyray.raytrain import DistributedConfig
from flyray.recsys import kernels
from flyray.recsys.funksvd import (
    EpochMetrics,
    FunkSVD,
    FunkSVDParams,
    TrainingSet,
    VisitOrder,
    init_factors,
    negative_weights,
)

log = logging.getLogger(__name__)


@dataclass
class Ratings:
    """Ratings as dense row indices (the features step's user_idx, item_idx, rating)."""

    users: np.ndarray
    items: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        self.users = np.asarray(self.users, np.int32)
        self.items = np.asarray(self.items, np.int32)
        self.values = np.asarray(self.values, np.float32)

    def __len__(self) -> int:
        return len(self.values)


def balanced_blocks(counts: np.ndarray, d: int) -> np.ndarray:
    """Block of each row, d blocks with near-equal rating counts (rows dealt out in a snake
    order by decreasing count: vectorised, deterministic)."""
    order = np.argsort(-counts, kind="stable")
    lap = np.arange(len(counts)) % (2 * d)
    deal = np.where(lap < d, lap, 2 * d - 1 - lap)
    blocks = np.empty(len(counts), np.int32)
    blocks[order] = deal
    return blocks


def _local_index(blocks: np.ndarray, d: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(row -> index inside its block, the rows of each block in order)."""
    members = [np.flatnonzero(blocks == b) for b in range(d)]
    local = np.empty(len(blocks), np.int32)
    for rows in members:
        local[rows] = np.arange(len(rows), dtype=np.int32)
    return local, members


def _node() -> str:
    return ray.get_runtime_context().get_node_id()[:8]


@ray.remote(num_cpus=1)
class _DSGDWorker:
    """Holds one user block and its d rating shards; updates whichever item block it is given."""

    def __init__(self, w: int, shards, P, bu, val_shards, params: FunkSVDParams, mean: float):
        self.w = w
        self.shards = [
            TrainingSet(u, i, r, len(P), weights, params, w, j, neg_users=neg)
            for j, (u, i, r, weights, neg) in enumerate(shards)
        ]
        self.orders = [VisitOrder(s.users, params, w, j) for j, s in enumerate(self.shards)]
        self.P, self.bu = P.copy(), bu.copy()  # arrays from the object store are read-only
        self.val_shards, self.params, self.mean = val_shards, params, mean

    @ray.method(num_returns=2)
    def update(self, j: int, item_block: tuple[np.ndarray, np.ndarray], epoch: int):
        Q, bi = (a.copy() for a in item_block)  # object-store arrays are read-only
        data = self.shards[j].at(epoch)
        p = self.params
        sse = kernels.sgd_epoch(
            data.users, data.items, data.ratings, self.orders[j](epoch), self.P, Q, self.bu, bi,
            self.mean, p.lr, p.reg, p.biased,
        )  # fmt: skip
        return (Q, bi), {"worker": self.w, "node": _node(), "ratings": len(data), "sse": sse}

    def validate(self, *item_blocks) -> tuple[float, int]:
        """Squared error and count of this user block's validation ratings."""
        p, sse, n = self.params, 0.0, 0
        for j, (Q, bi) in enumerate(item_blocks):
            u, i, r = self.val_shards[j]
            preds = kernels.predict(
                u.astype(np.int64), i.astype(np.int64), self.P, Q, self.bu, bi,
                self.mean, p.biased, p.rating_min, p.rating_max,
            )  # fmt: skip
            sse += float(np.sum((preds - r) ** 2, dtype=np.float64))
            n += len(r)
        return sse, n

    def user_block(self) -> tuple[np.ndarray, np.ndarray]:
        return self.P, self.bu


class _Checkpoints:
    """epoch-NNNN/{model.npz, state.json} under a directory; latest.json names the newest."""

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
        from pyarrow.fs import FileType

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


def _worker_count(config: DistributedConfig) -> int:
    """`workers`, or when elastic as many as the free CPUs hold now, at least `min_workers`:
    a run that lost a node goes on with what is left instead of waiting for a replacement."""
    count = config.worker_count()
    if isinstance(count, int):
        return count
    fit = int(ray.available_resources().get("CPU", 0) // config.cpus_per_worker)
    return max(count[0], min(count[1], fit))


def train(
    train_ratings: Ratings,
    n_users: int,
    n_items: int,
    params: FunkSVDParams | None = None,
    config: DistributedConfig | None = None,
    validation: Ratings | None = None,
    user_ids: np.ndarray | None = None,
    item_ids: np.ndarray | None = None,
) -> FunkSVD:
    """Train FunkSVD on Ray and return the fitted model (raw ids from user_ids/item_ids)."""
    params = params or FunkSVDParams()
    config = config or DistributedConfig()
    if len(train_ratings) == 0:
        raise ValueError("no training ratings")
    if not ray.is_initialized():
        ray.init()
    args = (train_ratings, n_users, n_items, params)
    rest = (validation, user_ids, item_ids)
    if config.checkpoint_uri:
        return _train(*args, config, *rest)
    with tempfile.TemporaryDirectory(prefix="funksvd-") as folder:  # restarts still resume
        return _train(*args, replace(config, checkpoint_uri=folder), *rest)


def _train(
    train_ratings: Ratings,
    n_users: int,
    n_items: int,
    params: FunkSVDParams,
    config: DistributedConfig,
    validation: Ratings | None,
    user_ids: np.ndarray | None,
    item_ids: np.ndarray | None,
) -> FunkSVD:
    model = FunkSVD(params)
    model.user_ids = np.arange(n_users) if user_ids is None else np.asarray(user_ids)
    model.item_ids = np.arange(n_items) if item_ids is None else np.asarray(item_ids)
    model.set_seen(train_ratings.users, train_ratings.items)
    n_neg = len(train_ratings) * params.negatives
    model.global_mean = float(
        (train_ratings.values.sum(dtype=np.float64) + n_neg * params.negative_rating)
        / (len(train_ratings) + n_neg)
    )
    checkpoints = _Checkpoints(config.checkpoint_uri)
    for attempt in range(config.max_failures + 1):
        free = ray.available_resources().get("CPU", 0)
        count = _worker_count(config)  # again on a restart: the cluster may have shrunk
        start = _start_state(model, checkpoints, params, n_users, n_items)
        if attempt == 0:
            model.resumed_from_epoch = start  # a Flyte retry of a lost attempt
        workers: list = []
        try:
            _run_dsgd(model, start, train_ratings, validation, count, workers, config,
                      checkpoints)  # fmt: skip
            return model
        except (RayActorError, ObjectLostError) as exc:  # a worker or its node is gone
            if attempt == config.max_failures:
                raise
            log.warning("a worker was lost (%s); resuming from the last checkpoint", exc)
        finally:
            _stop(workers, free)
    raise AssertionError("unreachable")


def _stop(workers: list, free_before: float, timeout: float = 10.0) -> None:
    """Kill the workers and wait until their CPUs show as free again, so that a restart or the
    next training sizes itself on the real cluster (CPUs of a lost node never come back)."""
    for w in workers:
        ray.kill(w)
    deadline = time.monotonic() + timeout
    while workers and time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= free_before:
            return
        time.sleep(0.05)


def _started(workers: list, cpus_per_worker: int, timeout: float = 120.0) -> None:
    """Wait until every worker actor runs; a cluster short of CPUs is an error, not a hang."""
    try:
        ray.get([w.__ray_ready__.remote() for w in workers], timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(
            f"{len(workers)} training workers need {len(workers) * cpus_per_worker} free CPUs; "
            f"the Ray cluster has {ray.available_resources().get('CPU', 0):g} free of "
            f"{ray.cluster_resources().get('CPU', 0):g}. Set workers lower or add Ray nodes."
        ) from None


def _start_state(model, checkpoints, params, n_users, n_items) -> int:
    """Set the model to epoch 0 or to the latest checkpoint; return the epoch reached."""
    model.P, model.Q, model.bu, model.bi = init_factors(params, n_users, n_items)
    model.history = []
    saved = checkpoints.latest()
    if saved is None:
        return 0
    arrays, state = saved
    # Training longer than the checkpointed run is a resume; any other change is a new run.
    expected = {**asdict(params), "n_epochs": None}
    found = {**state["params"], "n_epochs": None}
    shapes_match = arrays["P"].shape == model.P.shape and arrays["Q"].shape == model.Q.shape
    if found != expected or not shapes_match:
        raise ValueError(
            f"checkpoint in {checkpoints.uri} was written by a different training "
            f"({found}, P{arrays['P'].shape}); use a new checkpoint_uri or the same settings"
        )
    model.P, model.Q, model.bu, model.bi = arrays["P"], arrays["Q"], arrays["bu"], arrays["bi"]
    model.history = [EpochMetrics(**m) for m in state["history"]]
    log.info("resuming from %s at epoch %d", checkpoints.uri, state["epoch"])
    return int(state["epoch"])


def _end_epoch(model, epoch, train_sse, n_train, val, began, workers, checkpoints, config):
    p = model.params
    metrics = EpochMetrics(
        epoch,
        float(np.sqrt(train_sse / n_train)),
        val,
        time.perf_counter() - began,
        [{k: v for k, v in w.items() if k != "sse"} for w in workers],
    )
    model.history.append(metrics)
    per_worker = ", ".join(f"w{w['worker']}@{w['node']}: {w['ratings']:,}" for w in workers)
    log.info(
        "epoch %d/%d: train RMSE %.4f, validation RMSE %s, %.2fs [%s]",
        epoch, p.n_epochs, metrics.train_rmse,
        "n/a" if val is None else f"{val:.4f}", metrics.seconds, per_worker,
    )  # fmt: skip
    if epoch % config.checkpoint_every == 0 or epoch == p.n_epochs:
        checkpoints.save(
            epoch,
            {"P": model.P, "Q": model.Q, "bu": model.bu, "bi": model.bi},
            {
                "epoch": epoch,
                "params": asdict(p),
                "history": [asdict(m) for m in model.history],
            },
        )


def _shards(r: Ratings, ub, ib, ulocal, ilocal, d) -> list[list[tuple]]:
    """shards[w][j] = (local user, local item, rating) of block (w, j)."""
    key = ub[r.users].astype(np.int64) * d + ib[r.items]
    order = np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[order], np.arange(d * d + 1))
    out = []
    for w in range(d):
        row = []
        for j in range(d):
            sel = order[bounds[w * d + j] : bounds[w * d + j + 1]]
            row.append((ulocal[r.users[sel]], ilocal[r.items[sel]], r.values[sel]))
        out.append(row)
    return out


def split_negatives(per_user: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """counts[u, j]: user u's per_user[u] negatives split over item blocks in proportion to
    their sampling mass (largest remainder), so that drawing counts[u, j] inside block j by
    weight follows the whole catalogue's distribution."""
    share = per_user[:, None] * (mass / mass.sum())[None, :]
    counts = np.floor(share).astype(np.int64)
    left = per_user - counts.sum(axis=1)
    rank = np.argsort(np.argsort(-(share - counts), axis=1, kind="stable"), axis=1)
    return counts + (rank < left[:, None])


def _run_dsgd(model, start, ratings, validation, d, workers, config, checkpoints) -> None:
    p = model.params
    n_users, n_items = len(model.P), len(model.Q)
    ub = balanced_blocks(np.bincount(ratings.users, minlength=n_users), d)
    ib = balanced_blocks(np.bincount(ratings.items, minlength=n_items), d)
    ulocal, umembers = _local_index(ub, d)
    ilocal, imembers = _local_index(ib, d)
    weights = negative_weights(ratings.items, n_items, p.negative_beta)
    per_user = np.bincount(ratings.users, minlength=n_users) * p.negatives
    split = split_negatives(per_user, np.array([weights[m].sum() for m in imembers]))
    shards = [
        [
            (u, i, r, weights[imembers[j]], np.repeat(ulocal[umembers[w]], split[umembers[w], j]))
            for j, (u, i, r) in enumerate(row)
        ]
        for w, row in enumerate(_shards(ratings, ub, ib, ulocal, ilocal, d))
    ]
    val = _shards(validation, ub, ib, ulocal, ilocal, d) if validation is not None else None
    empty = [(np.zeros(0, np.int32),) * 2 + (np.zeros(0, np.float32),)] * d
    worker = _DSGDWorker.options(num_cpus=config.cpus_per_worker)
    workers += [
        worker.remote(
            w,
            shards[w],
            model.P[umembers[w]],
            model.bu[umembers[w]],
            val[w] if val else empty,
            p,
            model.global_mean,
        )  # fmt: skip
        for w in range(d)
    ]
    _started(workers, config.cpus_per_worker)
    blocks = [ray.put((model.Q[imembers[j]], model.bi[imembers[j]])) for j in range(d)]
    log.info("dsgd: %d workers, %d x %d blocks, %d ratings", d, d, d, len(ratings))
    epochs = range(start + 1, p.n_epochs + 1)
    for epoch in console.progress(epochs, desc="FunkSVD", unit="epoch"):
        began = time.perf_counter()
        stats: dict[int, dict] = {}
        for s in range(d):
            step = [
                workers[w].update.remote((w + s) % d, blocks[(w + s) % d], epoch) for w in range(d)
            ]
            for w, (block_ref, stat_ref) in enumerate(step):
                blocks[(w + s) % d] = block_ref
                stat = ray.get(stat_ref)
                prev = stats.setdefault(w, {**stat, "ratings": 0, "sse": 0.0})
                prev["ratings"] += stat["ratings"]
                prev["sse"] += stat["sse"]
        val_rmse = None
        if val is not None:
            sums = ray.get([wk.validate.remote(*blocks) for wk in workers])
            val_rmse = float(np.sqrt(sum(s for s, _ in sums) / max(sum(n for _, n in sums), 1)))
        _gather(model, workers, blocks, umembers, imembers)
        sse = sum(s["sse"] for s in stats.values())
        n_train = sum(s["ratings"] for s in stats.values())
        _end_epoch(model, epoch, sse, n_train, val_rmse, began, list(stats.values()),
                   checkpoints, config)  # fmt: skip


def _gather(model, workers, blocks, umembers, imembers) -> None:
    """Copy the resident blocks back into the model's full P, Q and biases."""
    for w, (P, bu) in enumerate(ray.get([wk.user_block.remote() for wk in workers])):
        model.P[umembers[w]], model.bu[umembers[w]] = P, bu
    for j, (Q, bi) in enumerate(ray.get(blocks)):
        model.Q[imembers[j]], model.bi[imembers[j]] = Q, bi
