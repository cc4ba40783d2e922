"""FunkSVD: biased matrix factorisation trained by SGD, with Surprise-compatible hyperparameters.

    model = FunkSVD(n_factors=100, n_epochs=20).fit(ratings_df)      # user_id, item_id, rating
    model.predict([1, 2], [10, 20])                                  # unknown ids -> biases
    model.recommend([1, 2], n=10)                                    # top-N unseen items
    model.save("model/"); FunkSVD.load("model/")                     # npz + JSON, no pickle

The model keeps raw ids; internally users and items are dense row indices. `fit` runs in one
process on the compiled kernel; `flyray.recsys.distributed` trains the same model over Ray.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from flyray import console, storage
from flyray.arrays import segment_ranges
from flyray.recsys import kernels

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_SCORE_BLOCK = 1 << 24  # user x item scores ranked at once: 64 MiB, plus 128 MiB of indices


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


@dataclass
class EpochMetrics:
    epoch: int
    train_rmse: float
    validation_rmse: float | None
    seconds: float
    workers: list[dict] = field(default_factory=list)


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
        self.by_user = np.argsort(users, kind="stable")
        sorted_users = np.asarray(users)[self.by_user]
        self.starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
        if len(users) == 0:
            self.starts = np.zeros(0, np.int64)
        self.lengths = np.diff(np.r_[self.starts, len(users)])
        self.params, self.stream = params, stream

    def __call__(self, epoch: int) -> np.ndarray:
        if not self.params.shuffle:
            return self.by_user
        rng = np.random.default_rng((self.params.seed, epoch, *self.stream))
        perm = rng.permutation(len(self.starts))
        lengths = self.lengths[perm]
        return self.by_user[np.repeat(self.starts[perm], lengths) + segment_ranges(lengths)]


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
        if neg_users is None:
            neg_users = np.repeat(u, params.negatives) if params.negatives else u[:0]
        neg_users = np.asarray(neg_users, np.int32)
        self.users = np.concatenate([u, neg_users]).astype(np.int32)
        self.items = np.concatenate([i, np.zeros(len(neg_users), np.int32)]).astype(np.int32)
        neg = np.full(len(neg_users), params.negative_rating, np.float32)
        self.ratings = np.concatenate([r, neg]).astype(np.float32)
        order = np.lexsort((i, u))
        counts = np.bincount(u, minlength=n_users)
        self.seen_indptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self.seen_items = np.asarray(i, np.int32)[order]
        self.cdf = np.cumsum(np.asarray(weights, np.float64))
        self._drawn = -1

    def at(self, epoch: int) -> TrainingSet:
        """This set with the negatives of `epoch` (epoch 1's every epoch if not resampling)."""
        epoch = epoch if self.params.resample_negatives else 1
        n = self.n_ratings
        if epoch != self._drawn and len(self.users) > n:
            if self.cdf[-1] <= 0:
                raise ValueError("no item to sample negatives from (empty item block)")
            seed = int(np.random.default_rng((self.params.seed, epoch, 7919, *self.stream))
                       .integers(2**31))  # fmt: skip
            kernels.sample_negatives(
                self.users[n:], self.cdf, self.seen_indptr, self.seen_items, seed, self.items[n:]
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


def _index_of(known: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of ids in the sorted array `known`; -1 where unknown."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(known) == 0:
        return np.full(len(ids), -1, np.int64)
    pos = np.minimum(np.searchsorted(known, ids), len(known) - 1)
    return np.where(known[pos] == ids, pos, -1)


def _triples(data, ratings=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(data, pd.DataFrame):
        missing = {"user_id", "item_id", "rating"} - set(data.columns)
        if missing:
            raise ValueError(f"ratings frame lacks columns {sorted(missing)}")
        data = (data["user_id"], data["item_id"], data["rating"])
    elif ratings is not None:
        raise TypeError("pass a DataFrame or one (users, items, ratings) tuple")
    users, items, values = (np.asarray(a) for a in data)
    if not len(users) == len(items) == len(values):
        raise ValueError("users, items and ratings must have the same length")
    if len(users) == 0:
        raise ValueError("no ratings to fit")
    if not np.isfinite(values).all():
        raise ValueError("ratings contain NaN or infinite values")
    return users.astype(np.int64), items.astype(np.int64), values.astype(np.float32)


class FunkSVD:
    """Biased matrix factorisation: r_ui ~ mu + b_u + b_i + p_u . q_i."""

    def __init__(self, params: FunkSVDParams | None = None, **kwargs) -> None:
        self.params = params or FunkSVDParams(**kwargs)
        self.user_ids = np.zeros(0, np.int64)  # sorted raw ids; row k of P is user_ids[k]
        self.item_ids = np.zeros(0, np.int64)
        self.P = np.zeros((0, self.params.n_factors), np.float32)
        self.Q = np.zeros((0, self.params.n_factors), np.float32)
        self.bu = np.zeros(0, np.float32)
        self.bi = np.zeros(0, np.float32)
        self.global_mean = 0.0
        self.seen_indptr = np.zeros(1, np.int64)  # CSR of training items per user row
        self.seen_items = np.zeros(0, np.int32)
        self.history: list[EpochMetrics] = []
        self.resumed_from_epoch = 0  # > 0: training went on from that epoch's checkpoint
        # What fitted the factors when not FunkSVD's SGD, e.g. {"model": "ials", ...params}.
        self.trainer: dict = {}

    # ----------------------------------------------------------------------------- training

    def fit(self, data, validation=None) -> FunkSVD:
        """Fit on a DataFrame (user_id, item_id, rating) or a (users, items, ratings) tuple."""
        users, items, values = _triples(data)
        self.user_ids, u = np.unique(users, return_inverse=True)
        self.item_ids, i = np.unique(items, return_inverse=True)
        val = None
        if validation is not None:
            vu, vi, vr = _triples(validation)
            val = (_index_of(self.user_ids, vu), _index_of(self.item_ids, vi), vr)
        self.fit_indexed(u.astype(np.int32), i.astype(np.int32), values, val)
        return self

    def fit_indexed(
        self, u: np.ndarray, i: np.ndarray, r: np.ndarray, validation=None, on_epoch=None
    ) -> None:
        """Fit on dense row indices (ids already set); the one-process training loop.
        `on_epoch(model, epoch)` runs after each epoch (a tuning trial reports from it)."""
        p = self.params
        self.P, self.Q, self.bu, self.bi = init_factors(p, len(self.user_ids), len(self.item_ids))
        self.set_seen(u, i)
        weights = negative_weights(i, len(self.item_ids), p.negative_beta)
        data = TrainingSet(u, i, r, len(self.user_ids), weights, p)
        self.global_mean = data.mean()
        self.history = []
        visit = VisitOrder(data.users, p)
        for epoch in console.progress(range(1, p.n_epochs + 1), desc="SGD", unit="epoch"):
            began = time.perf_counter()
            order = visit(epoch)
            data.at(epoch)
            sse = kernels.sgd_epoch(
                data.users, data.items, data.ratings, order, self.P, self.Q, self.bu, self.bi,
                self.global_mean, p.lr, p.reg, p.biased,
            )  # fmt: skip
            metrics = EpochMetrics(
                epoch,
                float(np.sqrt(sse / len(data))),
                self.rmse_indexed(*validation) if validation is not None else None,
                time.perf_counter() - began,
                [{"worker": 0, "ratings": len(data)}],
            )
            self.history.append(metrics)
            if on_epoch is not None:
                on_epoch(self, epoch)
            log.info(
                "epoch %d/%d: train RMSE %.4f, validation RMSE %s, %.2fs",
                epoch, p.n_epochs, metrics.train_rmse, metrics.validation_rmse, metrics.seconds,
            )  # fmt: skip

    def set_seen(self, u: np.ndarray, i: np.ndarray) -> None:
        """Remember each user's training items (CSR), so `recommend` never returns them."""
        order = np.lexsort((i, u))
        counts = np.bincount(u, minlength=len(self.user_ids))
        self.seen_indptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self.seen_items = np.asarray(i)[order].astype(np.int32)

    # --------------------------------------------------------------------------- prediction

    def _predict_indexed(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        p = self.params
        return kernels.predict(
            u.astype(np.int64), i.astype(np.int64), self.P, self.Q, self.bu, self.bi,
            self.global_mean, p.biased, p.rating_min, p.rating_max,
        )  # fmt: skip

    def predict(self, users, items) -> np.ndarray:
        """Predicted ratings for (user, item) pairs; unknown users or items fall back to the
        biases that are known (the global mean when neither is)."""
        users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
        if users.shape != items.shape:
            raise ValueError("users and items must have the same length")
        return self._predict_indexed(
            _index_of(self.user_ids, users), _index_of(self.item_ids, items)
        )

    def rmse_indexed(self, u: np.ndarray, i: np.ndarray, r: np.ndarray) -> float:
        return rmse(self._predict_indexed(u, i), r)

    def recommend(self, users, n: int = 10, exclude_seen: bool = True) -> pd.DataFrame:
        """Top-n items per user as a DataFrame (user_id, rank, item_id, score).

        Unknown users get the items with the largest biases (the model's popularity).
        """
        users = np.asarray(users, np.int64)
        items, scores = self.top_n_indexed(_index_of(self.user_ids, users), n, exclude_seen)
        n = items.shape[1]
        lo, hi = self.params.rating_min, self.params.rating_max
        return pd.DataFrame(
            {
                "user_id": np.repeat(users, n),
                "rank": np.tile(np.arange(1, n + 1), len(users)),
                "item_id": self.item_ids[items.ravel()],
                "score": np.clip(scores.ravel(), lo, hi),
            }
        )

    def top_n_indexed(
        self, rows: np.ndarray, n: int, exclude_seen: bool = True, batch: int = 2048
    ) -> tuple[np.ndarray, np.ndarray]:
        """(item rows, scores) of the n best items for user rows (-1: unknown user), best first."""
        n = min(n, len(self.item_ids))
        batch = max(1, min(batch, _SCORE_BLOCK // max(1, len(self.item_ids))))
        out_items = np.empty((len(rows), n), np.int64)
        out_scores = np.empty((len(rows), n), np.float32)
        base = np.zeros(len(self.bi), np.float32)
        if self.params.biased:
            base += np.float32(self.global_mean)
            if self.params.rank_item_bias:
                base += self.bi
        for start in range(0, len(rows), batch):
            r = np.asarray(rows[start : start + batch])
            known = r >= 0
            scores = np.where(known[:, None], self.P[np.maximum(r, 0)] @ self.Q.T, 0.0)
            scores += base
            if self.params.biased:
                scores += np.where(known, self.bu[np.maximum(r, 0)], 0.0)[:, None]
            if exclude_seen:
                for k in np.flatnonzero(known):
                    row = r[k]
                    scores[
                        k, self.seen_items[self.seen_indptr[row] : self.seen_indptr[row + 1]]
                    ] = -np.inf
            top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
            top_scores = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            out_items[start : start + batch] = np.take_along_axis(top, order, 1)
            out_scores[start : start + batch] = np.take_along_axis(top_scores, order, 1)
        return out_items, out_scores

    # ---------------------------------------------------------------------------- save/load

    _ARRAYS = ("user_ids", "item_ids", "P", "Q", "bu", "bi", "seen_indptr", "seen_items")

    def save(self, uri: str) -> str:
        """Write model.npz and meta.json under `uri` (a directory, local or s3://), each whole
        or not at all."""
        fs, path = storage.filesystem(uri)
        buf = io.BytesIO()
        np.savez(buf, **{name: getattr(self, name) for name in self._ARRAYS})
        storage.write_atomic(fs, f"{path}/model.npz", buf.getvalue())
        meta = {
            "format": "flyray.funksvd",
            "version": FORMAT_VERSION,
            "params": asdict(self.params),
            "global_mean": self.global_mean,
            "history": [asdict(m) for m in self.history],
            "n_users": len(self.user_ids),
            "n_items": len(self.item_ids),
            "trainer": self.trainer,
        }
        storage.write_atomic(fs, f"{path}/meta.json", json.dumps(meta, indent=2).encode())
        return uri

    @classmethod
    def load(cls, uri: str) -> FunkSVD:
        fs, path = storage.filesystem(uri)
        with fs.open_input_stream(f"{path}/meta.json") as fh:
            meta = json.loads(fh.read())
        if meta.get("format") != "flyray.funksvd" or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{uri}: not a flyray FunkSVD model of format {FORMAT_VERSION}")
        with fs.open_input_stream(f"{path}/model.npz") as fh:
            arrays = np.load(io.BytesIO(fh.read()), allow_pickle=False)
            model = cls(FunkSVDParams(**meta["params"]))
            for name in cls._ARRAYS:
                setattr(model, name, arrays[name])
        model.global_mean = meta["global_mean"]
        model.trainer = meta.get("trainer", {})
        model.history = [EpochMetrics(**m) for m in meta["history"]]
        return model
