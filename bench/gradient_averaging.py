"""FunkSVD by gradient averaging over Ray workers: the original system's training, kept only so
that bench/funksvd.py can compare flyray's DSGD (flyray.recsys.distributed) with it.

Each worker holds a chunk of the ratings and computes its full-batch gradient against the
current model; the driver averages them per row and takes one step of size lr per epoch. That is
gradient descent, not SGD: the whole model goes through the driver every epoch, and it converges
far more slowly than DSGD. No checkpoints and no restarts: a benchmark run, not a product.
"""

from __future__ import annotations

import time

import numba
import numpy as np
import ray

from flyray.recsys import kernels
from flyray.recsys.funksvd import (
    FunkSVDParams,
    TrainingSet,
    negative_weights,
    new_model,
    rmse,
)
from flyray.recsys.model import EpochMetrics, FactorModel, Ratings


@numba.njit(nogil=True, fastmath=True, cache=True)
def gradient_sums(users, items, err, P, Q, bu, bi, reg: float, biased: bool):
    """Full-batch gradient of the regularised squared error over these ratings (err: each
    rating's error), summed per row: the original per-chunk computation."""
    gP, gQ = np.zeros_like(P), np.zeros_like(Q)
    gbu, gbi = np.zeros_like(bu), np.zeros_like(bi)
    for n in range(users.shape[0]):
        u, i, e = users[n], items[n], err[n]
        if biased:
            gbu[u] += e - reg * bu[u]
            gbi[i] += e - reg * bi[i]
        gP[u] += e * Q[i] - reg * P[u]
        gQ[i] += e * P[u] - reg * Q[i]
    return gP, gQ, gbu, gbi


@ray.remote(num_cpus=1)
class GradientWorker:
    """Holds a chunk of ratings; returns its full-batch gradient for a given model."""

    def __init__(self, w: int, chunk: Ratings, params: FunkSVDParams, mean: float):
        self.w, self.chunk, self.params, self.mean = w, chunk, params, mean

    def gradient(self, model):
        P, Q, bu, bi = model
        c, p = self.chunk, self.params
        u, i = c.users.astype(np.int64), c.items.astype(np.int64)
        err = c.values - kernels.predict(u, i, P, Q, bu, bi, self.mean, p.biased, -np.inf, np.inf)
        grads = gradient_sums(u, i, err, P, Q, bu, bi, p.reg, p.biased)
        sse = float(np.sum(err.astype(np.float64) ** 2))
        return *grads, {"worker": self.w, "ratings": len(c), "sse": sse}


def train(
    ratings: Ratings,
    n_users: int,
    n_items: int,
    params: FunkSVDParams,
    workers: int = 2,
    validation: Ratings | None = None,
) -> FactorModel:
    """FunkSVD fitted by `params.n_epochs` averaged gradient steps over `workers` actors."""
    p = params
    weights = negative_weights(ratings.items, n_items, p.negative_beta)
    drawn = TrainingSet(ratings.users, ratings.items, ratings.values, n_users, weights, p).at(1)
    model = new_model(p, np.arange(n_users), np.arange(n_items), ratings.users, ratings.items,
                      float(drawn.ratings.mean(dtype=np.float64)))  # fmt: skip
    ratings = Ratings(drawn.users, drawn.items, drawn.ratings)  # negatives drawn once here
    chunks = np.array_split(np.random.default_rng(p.seed).permutation(len(ratings)), workers)
    actors = [
        GradientWorker.remote(
            w, Ratings(ratings.users[c], ratings.items[c], ratings.values[c]), p, model.global_mean
        )
        for w, c in enumerate(chunks)
    ]
    # Each row's gradient is averaged over that row's ratings, then one step of size lr.
    n_u = np.maximum(np.bincount(ratings.users, minlength=n_users), 1).astype(np.float32)
    n_i = np.maximum(np.bincount(ratings.items, minlength=n_items), 1).astype(np.float32)
    try:
        for epoch in range(1, p.n_epochs + 1):
            began = time.perf_counter()
            ref = ray.put((model.P, model.Q, model.bu, model.bi))
            grads = ray.get([a.gradient.remote(ref) for a in actors])
            model.P += p.lr * sum(g[0] for g in grads) / n_u[:, None]
            model.Q += p.lr * sum(g[1] for g in grads) / n_i[:, None]
            if p.biased:
                model.bu += p.lr * sum(g[2] for g in grads) / n_u
                model.bi += p.lr * sum(g[3] for g in grads) / n_i
            val = None
            if validation is not None:
                val = rmse(model.score_indexed(validation.users, validation.items),
                           validation.values)  # fmt: skip
            sse = sum(g[4]["sse"] for g in grads)
            model.history.append(EpochMetrics(
                epoch, float(np.sqrt(sse / len(ratings))), val, time.perf_counter() - began,
                [{k: v for k, v in g[4].items() if k != "sse"} for g in grads],
            ))  # fmt: skip
    finally:
        for a in actors:
            ray.kill(a)
    return model
