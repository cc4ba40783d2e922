"""Implicit ALS (Hu, Koren, Volinsky 2008) over Ray actors holding user and item shards.

Every (user, item) pair is an example: preference p_ui = 1 with confidence c_ui = 1 + alpha *
r_ui where the user interacted (r_ui: the pipeline's implicit rating), p_ui = 0 with c_ui = 1
elsewhere. Alternating least squares minimises

    sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + reg (|X|^2 + |Y|^2)

one side at a time; each row's solve is a k x k system that touches only its own interactions
once Y'Y is known (the Gramian trick), solved by a few conjugate-gradient steps warm-started at
the previous factors (flyray.recsys.kernels.ials_solve). Rows are independent, so a half-step
is embarrassingly parallel: worker w holds user block w and item block w (CSR, balanced by
interaction count) and solves its rows against the other side's factors, which the driver
broadcasts through the object store with their Gramian. Results do not depend on the number of
workers: each row's solve is the same computation wherever it runs.

Each row's update (users shown; items alike with X and Y swapped) is the exact minimiser

    x_u = (Y'Y + reg I + sum_{i in R(u)} (c_ui - 1) y_i y_i')^{-1} sum_{i in R(u)} c_ui y_i

approached by `cg_steps` conjugate-gradient steps from the previous x_u.

The fitted model is a FactorModel with no biases (scores x_u . y_i clipped to [0, 1]).
Checkpoints, resume and worker-loss restarts are the harness's (flyray.recsys.harness), shared
with DSGD.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import ray

from flyray.raytrain import DistributedConfig
from flyray.recsys import harness, kernels
from flyray.recsys.model import EpochMetrics, FactorModel, Ratings

log = logging.getLogger(__name__)


@dataclass
class IALSParams:
    """Hyperparameters of implicit ALS, named as in `implicit`'s AlternatingLeastSquares."""

    n_factors: int = 64
    n_epochs: int = 15  # ALS iterations, each a user and an item half-step
    reg: float = 0.01
    alpha: float = 10.0  # confidence c_ui = 1 + alpha * rating
    cg_steps: int = 3  # conjugate-gradient steps per row and half-step
    init_std: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_factors < 1 or self.n_epochs < 0 or self.cg_steps < 1:
            raise ValueError("n_factors and cg_steps must be >= 1, n_epochs >= 0")
        if self.reg < 0 or self.alpha <= 0 or self.init_std < 0:
            raise ValueError("reg and init_std must be >= 0, alpha > 0")


class Rows:
    """One side's rows of a block in CSR (columns are the other side's global rows), with the
    confidence increment alpha * rating of each interaction."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int):
        order = np.lexsort((cols, rows))
        self.indptr = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=n_rows))))
        self.indices = np.asarray(cols, np.int32)[order]
        self.values = np.asarray(values, np.float32)[order]

    def solve(self, X: np.ndarray, Y: np.ndarray, gram: np.ndarray, cg_steps: int,
              error: bool = True):  # fmt: skip
        """(new X, squared error on the interactions or NaN) after one half-step."""
        X = np.array(X, np.float32)  # object-store arrays are read-only
        kernels.ials_solve(self.indptr, self.indices, self.values, X, Y, gram, cg_steps)
        if not error:
            return X, float("nan")
        rows = np.repeat(np.arange(len(X)), np.diff(self.indptr))
        pred = np.einsum("ij,ij->i", X[rows], Y[self.indices])
        return X, float(np.sum((1.0 - pred) ** 2, dtype=np.float64))


def _outer(Y: np.ndarray) -> np.ndarray:
    Y64 = Y.astype(np.float64)
    return Y64.T @ Y64


def gramian(Y: np.ndarray, reg: float) -> np.ndarray:
    """Y'Y + reg I in float64: computed once per half-step, shared by every row's solve."""
    return _outer(Y) + reg * np.eye(Y.shape[1])


def init_factors(params: IALSParams, n_users: int, n_items: int):
    rng = np.random.default_rng(params.seed)
    X = rng.normal(0, params.init_std, (n_users, params.n_factors)).astype(np.float32)
    Y = rng.normal(0, params.init_std, (n_items, params.n_factors)).astype(np.float32)
    return X, Y


@ray.remote(num_cpus=1)
class _ALSWorker:
    """Holds user block w and item block w, their interactions and their factors. A half-step
    gathers the other side's blocks straight from the other workers (object references; the
    driver only sums the k x k Gramians), solves its own rows and keeps them."""

    def __init__(self, rows: dict, factors: dict, members: dict, cg_steps: int):
        self.rows, self.members, self.cg_steps = rows, members, cg_steps
        self.factors = {side: np.array(f, np.float32) for side, f in factors.items()}

    @ray.method(num_returns=2)
    def block(self, side: str):
        """(this worker's factors of `side`, their Gramian without reg)."""
        return self.factors[side], _outer(self.factors[side])

    @ray.method(num_returns=3)
    def solve(self, side: str, other_blocks: list, gram: np.ndarray):
        other = "items" if side == "users" else "users"
        blocks = ray.get(other_blocks)
        Y = np.empty((sum(len(b) for b in blocks), blocks[0].shape[1]), np.float32)
        for rows, block in zip(self.members[other], blocks, strict=True):
            Y[rows] = block
        X, sse = self.rows[side].solve(self.factors[side], Y, gram, self.cg_steps,
                                       error=side == "items")  # fmt: skip
        self.factors[side] = X
        return X, _outer(X), sse


def _blocks(ratings: Ratings, n_users: int, n_items: int, alpha: float, d: int):
    """(user blocks' members, item blocks' members, [(user Rows, item Rows)] per worker)."""
    ub, ulocal, umembers = harness.block_rows(np.bincount(ratings.users, minlength=n_users), d)
    ib, ilocal, imembers = harness.block_rows(np.bincount(ratings.items, minlength=n_items), d)
    conf = alpha * ratings.values
    shards = []
    for w in range(d):
        us = ub[ratings.users] == w
        its = ib[ratings.items] == w
        shards.append((
            Rows(ulocal[ratings.users[us]], ratings.items[us], conf[us], len(umembers[w])),
            Rows(ilocal[ratings.items[its]], ratings.users[its], conf[its], len(imembers[w])),
        ))  # fmt: skip
    return umembers, imembers, shards


def fit_local(
    ratings: Ratings,
    n_users: int,
    n_items: int,
    params: IALSParams,
    on_epoch: Callable[[FactorModel, int], None] | None = None,
) -> FactorModel:
    """iALS in this process (one block, no actors): what a tuning trial runs on its CPU."""
    model = new_model(ratings, n_users, n_items, params)
    _, _, ((users, items),) = _blocks(ratings, n_users, n_items, params.alpha, 1)
    for epoch in range(1, params.n_epochs + 1):
        began = time.perf_counter()
        model.P, _ = users.solve(model.P, model.Q, gramian(model.Q, params.reg),
                                 params.cg_steps, error=False)  # fmt: skip
        model.Q, sse = items.solve(model.Q, model.P, gramian(model.P, params.reg),
                                   params.cg_steps)  # fmt: skip
        model.history.append(EpochMetrics(epoch, float(np.sqrt(sse / len(ratings))), None,
                                          time.perf_counter() - began,
                                          [{"worker": 0, "ratings": len(ratings)}]))  # fmt: skip
        if on_epoch is not None:
            on_epoch(model, epoch)
    return model


def new_model(ratings, n_users, n_items, params, user_ids=None, item_ids=None) -> FactorModel:
    """The artifact iALS fills in: initial factors, no biases, scores on [0, 1]."""
    model = FactorModel.empty(
        np.arange(n_users) if user_ids is None else user_ids,
        np.arange(n_items) if item_ids is None else item_ids,
        params.n_factors, score_min=0.0, score_max=1.0,
        trainer={"name": "ials", "params": asdict(params)},
    )  # fmt: skip
    model.P, model.Q = init_factors(params, n_users, n_items)
    return model.set_seen(ratings.users, ratings.items)


def train(
    ratings: Ratings,
    n_users: int,
    n_items: int,
    params: IALSParams | None = None,
    config: DistributedConfig | None = None,
    user_ids: np.ndarray | None = None,
    item_ids: np.ndarray | None = None,
) -> FactorModel:
    """iALS over `config.workers` Ray actors of the running Ray cluster."""
    params, config = params or IALSParams(), config or DistributedConfig()
    model = new_model(ratings, n_users, n_items, params, user_ids, item_ids)

    def attempt(model: FactorModel, start: int, d: int, workers: list, checkpoints) -> None:
        _run(model, start, ratings, params, d, workers, config, checkpoints)

    return harness.fit(model, attempt, config, arrays=("P", "Q"))


def _half_step(workers, side, blocks, grams, reg) -> float:
    """Every worker solves its rows of `side` against the other side's blocks; `blocks` and
    `grams` (references per worker and side) then name the new factors. Returns the summed
    squared error (NaN for users)."""
    other = "items" if side == "users" else "users"
    gram = sum(ray.get(grams[other]))
    gram = gram + reg * np.eye(len(gram))
    out = [w.solve.remote(side, blocks[other], gram) for w in workers]
    blocks[side], grams[side] = [o[0] for o in out], [o[1] for o in out]
    return sum(ray.get([o[2] for o in out]))


def _gather(model, blocks, umembers, imembers) -> None:
    """The workers' resident blocks copied into the model's full P and Q."""
    users, items = ray.get(blocks["users"]), ray.get(blocks["items"])
    for w, (P, Q) in enumerate(zip(users, items, strict=True)):
        model.P[umembers[w]], model.Q[imembers[w]] = P, Q


def _run(model, start, ratings, params, d, workers, config, checkpoints) -> None:
    n_users, n_items = len(model.P), len(model.Q)
    umembers, imembers, shards = _blocks(ratings, n_users, n_items, params.alpha, d)
    members = {"users": umembers, "items": imembers}
    worker = _ALSWorker.options(num_cpus=config.cpus_per_worker)
    workers += [
        worker.remote(
            {"users": users, "items": items},
            {"users": model.P[umembers[w]], "items": model.Q[imembers[w]]},
            members,
            params.cg_steps,
        )  # fmt: skip
        for w, (users, items) in enumerate(shards)
    ]
    harness.started(workers, config.cpus_per_worker)
    blocks: dict = {"users": [], "items": []}
    grams: dict = {"users": [], "items": []}
    for w in workers:
        for side in ("users", "items"):
            block, gram = w.block.remote(side)
            blocks[side].append(block)
            grams[side].append(gram)
    log.info("ials: %d workers, %d ratings", d, len(ratings))
    for epoch in range(start + 1, params.n_epochs + 1):
        began = time.perf_counter()
        _half_step(workers, "users", blocks, grams, params.reg)
        sse = _half_step(workers, "items", blocks, grams, params.reg)
        per_worker = [
            {"worker": w, "ratings": int(np.diff(s[0].indptr).sum())} for w, s in enumerate(shards)
        ]
        metrics = EpochMetrics(epoch, float(np.sqrt(sse / len(ratings))), None,
                               time.perf_counter() - began, per_worker)  # fmt: skip
        model.history.append(metrics)
        log.info("ials iteration %d/%d: interaction RMSE %.4f, %.2fs", epoch, params.n_epochs,
                 metrics.train_rmse, metrics.seconds)  # fmt: skip
        harness.checkpoint(
            model,
            epoch,
            params.n_epochs,
            config,
            checkpoints,
            lambda: _gather(model, blocks, umembers, imembers),
            ("P", "Q"),
        )
