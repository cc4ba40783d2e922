"""FunkSVD trained over Ray workers by stratified SGD (DSGD, after Gemulla et al., KDD 2011).

Users and items are cut into d blocks each, balanced by rating count, giving a d x d grid of
rating shards. Worker w keeps user block w (its rows of P and b_u) and the shards (w, 0..d-1)
resident. In sub-epoch s worker w updates item block (w + s) mod d: the d workers touch disjoint
rows of P and Q, so they run in parallel with no locks and no averaging, and every update is an
exact SGD step of FunkSVD's rule (flyray.recsys.funksvd.FunkSVD). Item blocks (rows of Q and b_i)
then move to the next worker as Ray object references, never through the driver. The visiting
order inside a shard depends only on (seed, epoch, shard), so a run is deterministic for a
seed, whatever the timing. (The original system's gradient averaging lives on in
bench/gradient_averaging.py, for comparison only.)

Checkpoints, resume and restarts after a lost worker are the harness's
(flyray.recsys.harness), shared with iALS, configured by flyray.raytrain's DistributedConfig.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import ray

from flyray import console
from flyray.raytrain import DistributedConfig
from flyray.recsys import harness, kernels
from flyray.recsys.funksvd import (
    FunkSVDParams,
    TrainingSet,
    VisitOrder,
    negative_weights,
    new_model,
)
from flyray.recsys.model import EpochMetrics, FactorModel, Ratings

log = logging.getLogger(__name__)


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
        return (Q, bi), {"worker": self.w, "node": harness.node(), "ratings": len(data), "sse": sse}

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


def train(
    train_ratings: Ratings,
    n_users: int,
    n_items: int,
    params: FunkSVDParams | None = None,
    config: DistributedConfig | None = None,
    validation: Ratings | None = None,
    user_ids: np.ndarray | None = None,
    item_ids: np.ndarray | None = None,
) -> FactorModel:
    """FunkSVD by DSGD on the running Ray cluster (raw ids from user_ids/item_ids)."""
    params, config, r = params or FunkSVDParams(), config or DistributedConfig(), train_ratings
    n_neg = len(r) * params.negatives
    mean = (r.values.sum(dtype=np.float64) + n_neg * params.negative_rating) / max(
        len(r) + n_neg, 1
    )
    model = new_model(
        params, np.arange(n_users) if user_ids is None else user_ids,
        np.arange(n_items) if item_ids is None else item_ids, r.users, r.items, float(mean),
    )  # fmt: skip

    def attempt(model: FactorModel, start: int, d: int, workers: list, checkpoints) -> None:
        _run_dsgd(model, params, start, r, validation, d, workers, config, checkpoints)

    return harness.fit(model, attempt, config)


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


def _run_dsgd(model, p, start, ratings, validation, d, workers, config, checkpoints) -> None:
    n_users, n_items = len(model.P), len(model.Q)
    ub, ulocal, umembers = harness.block_rows(np.bincount(ratings.users, minlength=n_users), d)
    ib, ilocal, imembers = harness.block_rows(np.bincount(ratings.items, minlength=n_items), d)
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
    harness.started(workers, config.cpus_per_worker)
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
        per_worker = list(stats.values())
        n_train = sum(s["ratings"] for s in per_worker)
        metrics = EpochMetrics(
            epoch, float(np.sqrt(sum(s["sse"] for s in per_worker) / n_train)), val_rmse,
            time.perf_counter() - began,
            [{k: v for k, v in w.items() if k != "sse"} for w in per_worker],
        )  # fmt: skip
        model.history.append(metrics)
        log.info(
            "epoch %d/%d: train RMSE %.4f, validation RMSE %s, %.2fs [%s]",
            epoch, p.n_epochs, metrics.train_rmse, "n/a" if val_rmse is None else f"{val_rmse:.4f}",
            metrics.seconds,
            ", ".join(f"w{w['worker']}@{w['node']}: {w['ratings']:,}" for w in per_worker),
        )  # fmt: skip
        harness.checkpoint(model, epoch, p.n_epochs, config, checkpoints,
                           lambda: _gather(model, workers, blocks, umembers, imembers),
                           ("P", "Q", "bu", "bi"))  # fmt: skip


def _gather(model, workers, blocks, umembers, imembers) -> None:
    """Copy the resident blocks back into the model's full P, Q and biases."""
    for w, (P, bu) in enumerate(ray.get([wk.user_block.remote() for wk in workers])):
        model.P[umembers[w]], model.bu[umembers[w]] = P, bu
    for j, (Q, bi) in enumerate(ray.get(blocks)):
        model.Q[imembers[j]], model.bi[imembers[j]] = Q, bi
