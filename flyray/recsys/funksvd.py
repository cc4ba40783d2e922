"""FunkSVD: biased matrix factorisation trained by SGD, with Surprise-compatible hyperparameters.

    model = FunkSVD(n_factors=100, n_epochs=20).fit(ratings_df)      # user_id, item_id, rating
    model.score([1, 2], [10, 20])                                    # a FactorModel
    model.recommend([1, 2], n=10)                                    # top-N unseen items

Internally users and items are dense row indices. `fit` runs in one process on the compiled
kernel; `flyray.recsys.distributed` trains the same model over Ray (DSGD).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from flyray import console
from flyray.recsys import kernels
from flyray.recsys.model import EpochMetrics, FactorModel, seen_csr

log = logging.getLogger(__name__)


@dataclass
class FunkSVDParams:
    """Hyperparameters, named and defaulted as in Surprise's SVD."""

    n_factors: int = 100
    n_epochs: int = 20
    lr: float = 0.005
    reg: float = 0.02
    init_mean: float = 0.0
    init_std: float = 0.1
    biased: bool = True
    seed: int = 0
    # Visit users in a fresh random order each epoch (Surprise keeps one fixed order).
    shuffle: bool = True
    rating_min: float = 1.0
    rating_max: float = 5.0
    # Implicit feedback: per rating, this many items the user never touched are added with
    # rating `negative_rating`, so that scores rank seen-worthy items above the rest (0: off,
    # plain explicit-rating FunkSVD as in Surprise). They are drawn again every epoch
    # (`resample_negatives`), item i with probability proportional to popularity_i **
    # `negative_beta` (0: uniform; 1: as often as items are rated, so that popular items are
    # not ranked up merely for being popular).
    negatives: int = 0
    negative_rating: float = 0.0
    negative_beta: float = 0.0
    resample_negatives: bool = True
    # False: rank by mu + b_u + p_u . q_i, leaving the item bias (mostly popularity) out of
    # recommendations while it still absorbs popularity in training.
    rank_item_bias: bool = True

    def __post_init__(self) -> None:
        if self.negatives < 0:
            raise ValueError("negatives must be >= 0")
        if self.negatives and not self.rating_min <= self.negative_rating <= self.rating_max:
            raise ValueError("negative_rating must lie on the rating scale (lower rating_min)")
        if self.negative_beta < 0:
            raise ValueError("negative_beta must be >= 0 (0: uniform negatives)")
        if self.n_factors < 1 or self.n_epochs < 0:
            raise ValueError("n_factors must be >= 1 and n_epochs >= 0")
        if self.lr <= 0 or self.reg < 0 or self.init_std < 0:
            raise ValueError("lr must be > 0, reg and init_std >= 0")
        if self.rating_max <= self.rating_min:
            raise ValueError("rating_max must exceed rating_min")


def init_factors(params: FunkSVDParams, n_users: int, n_items: int):
    """Initial P, Q (normal), biases (zero): the same for every way of training."""
    rng = np.random.default_rng(params.seed)
    shape_p, shape_q = (n_users, params.n_factors), (n_items, params.n_factors)
    P = rng.normal(params.init_mean, params.init_std, shape_p).astype(np.float32)
    Q = rng.normal(params.init_mean, params.init_std, shape_q).astype(np.float32)
    return P, Q, np.zeros(n_users, np.float32), np.zeros(n_items, np.float32)


class VisitOrder:
    """The order ratings are visited in each epoch: user by user, each user's ratings together
    (their row of P stays in cache: 5x the updates/s of a full shuffle here), users in a fresh
    random order every epoch. It depends only on (seed, epoch, stream), so a resumed or re-run
    training repeats exactly. With shuffle=False users come in id order, like Surprise."""

    def __init__(self, users: np.ndarray, params: FunkSVDParams, *stream: int):
        # int32 positions, and one buffer refilled every epoch: at 10M events the order is 22M
        # entries, and int64 temporaries per epoch made up a third of a tuning trial's memory.
        self.by_user = np.argsort(users, kind="stable").astype(np.int32)
        sorted_users = np.asarray(users)[self.by_user]
        self.starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
        if len(users) == 0:
            self.starts = np.zeros(0, np.int64)
        self.lengths = np.diff(np.r_[self.starts, len(users)])
        self.params, self.stream = params, stream
        self._order = np.empty(len(users) if params.shuffle else 0, np.int32)

    def __call__(self, epoch: int) -> np.ndarray:
        """The epoch's order (a buffer the next call overwrites)."""
        if not self.params.shuffle:
            return self.by_user
        rng = np.random.default_rng((self.params.seed, epoch, *self.stream))
        perm = rng.permutation(len(self.starts))
        kernels.gather_runs(self.by_user, self.starts, self.lengths, perm, self._order)
        return self._order


class TrainingSet:
    """The ratings of one shard plus `params.negatives` sampled items per rating at
    `negative_rating`. The negatives' users are fixed and stored beside the ratings, so one
    VisitOrder serves every epoch; their items are drawn again each epoch (`at(epoch)`), by
    popularity ** negative_beta among the block's items (`weights`), never an item the user
    rated here (16 redraws, for users who rated nearly every item). Draws depend only on
    (seed, epoch, stream): a resumed or re-run training repeats exactly.

    `neg_users` says how many negatives each user gets here; by default `negatives` per rating.
    DSGD passes a user's negatives split over item blocks by the blocks' sampling mass, so the
    union over blocks follows the same distribution as one process does."""

    def __init__(
        self,
        u: np.ndarray,
        i: np.ndarray,
        r: np.ndarray,
        n_users: int,
        weights: np.ndarray,
        params: FunkSVDParams,
        *stream: int,
        neg_users: np.ndarray | None = None,
    ):
        self.params, self.stream, self.n_ratings = params, stream, len(r)
        n, k = len(r), params.negatives
        n_neg = n * k if neg_users is None else len(neg_users)
        # Filled in place: no concatenated temporaries (22M entries each at 10M events).
        self.users = np.empty(n + n_neg, np.int32)
        self.users[:n] = u
        if neg_users is None:
            self.users[n:].reshape(n, k)[:] = np.asarray(u, np.int32)[:, None]  # k per rating
        else:
            self.users[n:] = neg_users
        self.items = np.zeros(n + n_neg, np.int32)
        self.items[:n] = i
        self.ratings = np.full(n + n_neg, params.negative_rating, np.float32)
        self.ratings[:n] = r
        self.seen_indptr, self.seen_items = seen_csr(u, i, n_users)
        weights = np.asarray(weights, np.float64)
        drawable = n_neg and len(weights) and weights.sum() > 0
        self.alias = kernels.alias_table(weights) if drawable else None
        self._drawn = -1

    def at(self, epoch: int) -> TrainingSet:
        """This set with the negatives of `epoch` (epoch 1's every epoch if not resampling)."""
        epoch = epoch if self.params.resample_negatives else 1
        n = self.n_ratings
        if epoch != self._drawn and len(self.users) > n:
            if self.alias is None:
                raise ValueError("no item to sample negatives from (empty item block)")
            seed = int(np.random.default_rng((self.params.seed, epoch, 7919, *self.stream))
                       .integers(2**31))  # fmt: skip
            kernels.sample_negatives(
                self.users[n:], *self.alias, self.seen_indptr, self.seen_items, seed, self.items[n:]
            )
        self._drawn = epoch
        return self

    def __len__(self) -> int:
        return len(self.ratings)

    def mean(self) -> float:
        return float(self.ratings.mean(dtype=np.float64))


def negative_weights(items: np.ndarray, n_items: int, beta: float) -> np.ndarray:
    """Each item's sampling weight for negatives: its training popularity ** beta (beta 0:
    every item alike, also those never rated)."""
    counts = np.bincount(items, minlength=n_items).astype(np.float64)
    return np.ones(n_items) if beta == 0 else counts**beta


def rmse(predictions: np.ndarray, ratings: np.ndarray) -> float:
    if len(ratings) == 0:
        return float("nan")
    return float(np.sqrt(np.mean((predictions - ratings) ** 2, dtype=np.float64)))


def _triples(data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(data, pd.DataFrame):
        missing = {"user_id", "item_id", "rating"} - set(data.columns)
        if missing:
            raise ValueError(f"ratings frame lacks columns {sorted(missing)}")
        data = (data["user_id"], data["item_id"], data["rating"])
    users, items, values = (np.asarray(a) for a in data)
    if not len(users) == len(items) == len(values):
        raise ValueError("users, items and ratings must have the same length")
    if len(users) == 0:
        raise ValueError("no ratings to fit")
    if not np.isfinite(values).all():
        raise ValueError("ratings contain NaN or infinite values")
    return users.astype(np.int64), items.astype(np.int64), values.astype(np.float32)


def new_model(params: FunkSVDParams, user_ids, item_ids, u, i, global_mean: float) -> FactorModel:
    """The artifact FunkSVD fills in: initial factors, zero biases, the users' training items,
    scores clipped to the rating scale (mu and the biases stay zero when unbiased)."""
    model = FactorModel.empty(
        user_ids, item_ids, params.n_factors,
        global_mean=global_mean if params.biased else 0.0,
        rank_item_bias=params.rank_item_bias,
        score_min=params.rating_min, score_max=params.rating_max,
        trainer={"name": "funksvd", "params": asdict(params)},
    )  # fmt: skip
    model.P, model.Q, model.bu, model.bi = init_factors(params, len(user_ids), len(item_ids))
    return model.set_seen(u, i)


class FunkSVD:
    """Biased matrix factorisation trained by SGD (Funk 2006; Surprise's SVD).

    Predicts r_ui ~ mu + b_u + b_i + p_u . q_i and minimises

        sum_{(u,i) in R} (r_ui - mu - b_u - b_i - p_u . q_i)^2
            + reg (b_u^2 + b_i^2 + |p_u|^2 + |q_i|^2)

    over the ratings R (plus `negatives` sampled unseen items per rating at
    `negative_rating`), one rating at a time: with e = r_ui - prediction,

        b_u += lr (e - reg b_u)          p_u += lr (e q_i - reg p_u)
        b_i += lr (e - reg b_i)          q_i += lr (e p_u - reg q_i)

    mu is the mean training rating; biased=False drops mu and the biases. `fit` runs in this
    process on the compiled kernel; flyray.recsys.distributed trains the same model over Ray.
    """

    def __init__(self, params: FunkSVDParams | None = None, **kwargs) -> None:
        self.params = params or FunkSVDParams(**kwargs)

    def fit(self, data, validation=None) -> FactorModel:
        """Fit on a DataFrame (user_id, item_id, rating) or a (users, items, ratings) tuple."""
        users, items, values = _triples(data)
        user_ids, u = np.unique(users, return_inverse=True)
        item_ids, i = np.unique(items, return_inverse=True)
        val = None
        if validation is not None:
            vu, vi, vr = _triples(validation)
            known = pd.Index(user_ids).get_indexer(vu), pd.Index(item_ids).get_indexer(vi)
            val = (*known, vr)
        return self.fit_indexed(u.astype(np.int32), i.astype(np.int32), values, user_ids,
                                item_ids, val)  # fmt: skip

    def fit_indexed(
        self, u, i, r, user_ids=None, item_ids=None, validation=None, on_epoch=None
    ) -> FactorModel:
        """Fit on dense rows (ids: their raw ids, default the rows themselves); the
        one-process training loop. `on_epoch(model, epoch)` runs after each epoch (a tuning
        trial reports from it)."""
        p = self.params
        user_ids = np.arange(u.max(initial=-1) + 1) if user_ids is None else user_ids
        item_ids = np.arange(i.max(initial=-1) + 1) if item_ids is None else item_ids
        weights = negative_weights(i, len(item_ids), p.negative_beta)
        data = TrainingSet(u, i, r, len(user_ids), weights, p)
        model = new_model(p, user_ids, item_ids, u, i, data.mean())
        visit = VisitOrder(data.users, p)
        for epoch in console.progress(range(1, p.n_epochs + 1), desc="SGD", unit="epoch"):
            began = time.perf_counter()
            order = visit(epoch)
            data.at(epoch)
            sse = kernels.sgd_epoch(
                data.users, data.items, data.ratings, order, model.P, model.Q, model.bu,
                model.bi, model.global_mean, p.lr, p.reg, p.biased,
            )  # fmt: skip
            metrics = EpochMetrics(
                epoch,
                float(np.sqrt(sse / len(data))),
                rmse(model.score_indexed(*validation[:2]), validation[2])
                if validation is not None else None,
                time.perf_counter() - began,
                [{"worker": 0, "ratings": len(data)}],
            )  # fmt: skip
            model.history.append(metrics)
            if on_epoch is not None:
                on_epoch(model, epoch)
            log.info(
                "epoch %d/%d: train RMSE %.4f, validation RMSE %s, %.2fs",
                epoch, p.n_epochs, metrics.train_rmse, metrics.validation_rmse, metrics.seconds,
            )  # fmt: skip
        return model
