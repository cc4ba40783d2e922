"""The recommender's one model interface: a factor model, whatever trained it.

    model = FactorModel.load("model/")                     # npz + JSON, no pickle
    model.recommend([42, 43], n=10)                         # top-n unseen items per user
    model.score([42, 42], [1001, 1002])                     # pair scores
    model.similar_items([1001], n=5)                        # nearest items by cosine
    model.save("model/")

A user's score for an item is mu + b_u + b_i + x_u . y_i (biases zero for an unbiased model;
`rank_item_bias` False leaves b_i out of rankings). FunkSVD (SGD or DSGD), iALS and the
popularity and biases baselines each produce one (flyray.recsys.trainers), so the pyfunc,
serving, evaluation, champion scoring and batch recommendations read nothing else. Ids are
the caller's raw ids; row k of the user factors is user_ids[k]. Scores are ranked in blocks:
the user x item product by BLAS, selection of the best n by a compiled kernel
(flyray.recsys.kernels.top_n).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from flyray import storage
from flyray.recsys import kernels

FORMAT = "flyray.factors"
FORMAT_VERSION = 1
_SCORE_BLOCK = 1 << 24  # user x item scores held at once: 64 MiB of float32
_ARRAYS = ("user_ids", "item_ids", "P", "Q", "bu", "bi", "seen_indptr", "seen_items")


@dataclass
class EpochMetrics:
    """One epoch of any trainer: its training error, validation RMSE if any, time and work."""

    epoch: int
    train_rmse: float
    validation_rmse: float | None
    seconds: float
    workers: list[dict] = field(default_factory=list)


@dataclass
class Ratings:
    """Ratings as dense row indices (the features step's user_idx, item_idx, rating): what
    every trainer and the evaluation take."""

    users: np.ndarray
    items: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        self.users = np.asarray(self.users, np.int32)
        self.items = np.asarray(self.items, np.int32)
        self.values = np.asarray(self.values, np.float32)

    def __len__(self) -> int:
        return len(self.values)


def seen_csr(users: np.ndarray, items: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, items sorted per user): each user row's training items as one CSR."""
    order = np.lexsort((items, users))
    counts = np.bincount(np.asarray(users, np.int64), minlength=n_users)
    indptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return indptr, np.asarray(items)[order].astype(np.int32)


def _rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values[rows], zeros where a row is -1 (an id the model never saw)."""
    out = np.zeros((len(rows), *values.shape[1:]), values.dtype)
    known = rows >= 0
    out[known] = values[rows[known]]
    return out


@dataclass(eq=False)
class FactorModel:
    """Factors, biases, id maps and training items of a trained recommender."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    P: np.ndarray  # user factors, one row per user id
    Q: np.ndarray  # item factors
    bu: np.ndarray
    bi: np.ndarray
    global_mean: float = 0.0
    seen_indptr: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    seen_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    rank_item_bias: bool = True
    score_min: float = -np.inf  # scores are clipped to the trainer's rating scale
    score_max: float = np.inf
    trainer: dict = field(default_factory=dict)  # {"name": ..., "params": {...}}
    history: list[EpochMetrics] = field(default_factory=list)
    resumed_from_epoch: int = 0  # > 0: training went on from that epoch's checkpoint

    @classmethod
    def empty(cls, user_ids, item_ids, n_factors: int, **kwargs) -> FactorModel:
        """Zero factors and biases for these ids (a trainer fills them in)."""
        nu, ni = len(user_ids), len(item_ids)
        return cls(
            np.asarray(user_ids), np.asarray(item_ids),
            np.zeros((nu, n_factors), np.float32), np.zeros((ni, n_factors), np.float32),
            np.zeros(nu, np.float32), np.zeros(ni, np.float32),
            seen_indptr=np.zeros(nu + 1, np.int64), **kwargs,
        )  # fmt: skip

    @property
    def name(self) -> str:
        return self.trainer.get("name", "factors")

    def set_seen(self, u: np.ndarray, i: np.ndarray) -> FactorModel:
        """Remember each user row's training items, which `recommend` never returns."""
        self.seen_indptr, self.seen_items = seen_csr(u, i, len(self.user_ids))
        return self

    # ------------------------------------------------------------------------------- ids

    @cached_property
    def _users(self) -> pd.Index:
        return pd.Index(self.user_ids)

    @cached_property
    def _items(self) -> pd.Index:
        return pd.Index(self.item_ids)

    def user_rows(self, users) -> np.ndarray:
        """Rows of raw user ids; -1 for ids the model never saw."""
        return self._users.get_indexer(np.asarray(users, self.user_ids.dtype))

    def item_rows(self, items) -> np.ndarray:
        return self._items.get_indexer(np.asarray(items, self.item_ids.dtype))

    # -------------------------------------------------------------------------- scoring

    def score_indexed(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """Clipped scores of (user row, item row) pairs; -1 rows contribute nothing."""
        return kernels.predict(
            np.asarray(u, np.int64), np.asarray(i, np.int64), self.P, self.Q, self.bu, self.bi,
            self.global_mean, True, self.score_min, self.score_max,
        )  # fmt: skip

    def score(self, users, items) -> np.ndarray:
        """Scores of (user, item) pairs; unknown users or items fall back to the biases that
        are known (the global mean when neither is)."""
        users, items = np.asarray(users), np.asarray(items)
        if users.shape != items.shape:
            raise ValueError("users and items must have the same length")
        return self.score_indexed(self.user_rows(users), self.item_rows(items))

    def top_n_indexed(
        self, rows: np.ndarray, n: int, filter_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """(item rows, scores) of the n best items for user rows (-1: unknown user), best
        first; fewer than n where a user has seen nearly everything (padded with -1)."""
        rows = np.asarray(rows, np.int64)
        n = min(n, len(self.item_ids))
        items = np.empty((len(rows), n), np.int64)
        scores = np.empty((len(rows), n), np.float32)
        base = np.float32(self.global_mean) + (self.bi if self.rank_item_bias else 0 * self.bi)
        base = np.ascontiguousarray(base, np.float32)
        no_seen = (np.zeros(len(self.user_ids) + 1, np.int64), np.zeros(0, np.int32))
        indptr, seen = (self.seen_indptr, self.seen_items) if filter_seen else no_seen
        block = max(1, min(4096, _SCORE_BLOCK // max(1, len(self.item_ids))))
        for s in range(0, len(rows), block):
            r = rows[s : s + block]
            known = np.maximum(r, 0)
            product = np.asarray(self.P[known] @ self.Q.T, np.float32)  # BLAS
            product[r < 0] = 0.0  # an unknown user has no factors: biases rank for them
            bu = np.where(r >= 0, self.bu[known], 0).astype(np.float32)
            kernels.top_n(product, r, bu, base, indptr, seen, items[s : s + block],
                          scores[s : s + block])  # fmt: skip
        return items, scores

    def recommend(self, users, n: int = 10, filter_seen: bool = True) -> pd.DataFrame:
        """Top-n items per user as a DataFrame (user_id, rank, item_id, score). Unknown users
        get the items with the largest biases (the model's popularity)."""
        users = np.asarray(users)
        items, scores = self.top_n_indexed(self.user_rows(users), n, filter_seen)
        return self.frame(users, items, scores)

    def frame(self, users: np.ndarray, items: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
        """Top-n item rows as (user_id, rank, item_id, score), padding dropped."""
        n = items.shape[1]
        keep = items.ravel() >= 0
        return pd.DataFrame(
            {
                "user_id": np.repeat(users, n)[keep],
                "rank": np.tile(np.arange(1, n + 1), len(users))[keep],
                "item_id": self.item_ids[items.ravel()[keep]],
                "score": np.clip(scores.ravel()[keep], self.score_min, self.score_max),
            }
        )

    def similar_items(self, items, n: int = 10) -> pd.DataFrame:
        """The n items nearest each given item by cosine of their factors, the item itself
        left out, as (item_id, rank, similar_item_id, similarity)."""
        items = np.asarray(items)
        rows = self.item_rows(items)
        if (rows < 0).any():
            raise KeyError(f"unknown item ids: {items[rows < 0][:10].tolist()}")
        norms = np.linalg.norm(self.Q, axis=1).astype(np.float32)
        unit = np.divide(
            self.Q, norms[:, None], out=np.zeros_like(self.Q), where=norms[:, None] > 0
        )
        product = np.ascontiguousarray(unit[rows] @ unit.T, np.float32)
        # Each item's own column is masked as if "seen" by a user whose only item it is.
        indptr = np.arange(len(rows) + 1, dtype=np.int64)
        n = min(n, len(self.item_ids) - 1)
        out_items = np.empty((len(rows), n), np.int64)
        out_scores = np.empty((len(rows), n), np.float32)
        own = np.arange(len(rows), dtype=np.int64)
        kernels.top_n(product, own, np.zeros(len(rows), np.float32),
                      np.zeros(len(self.item_ids), np.float32), indptr, rows.astype(np.int32),
                      out_items, out_scores)  # fmt: skip
        return pd.DataFrame(
            {
                "item_id": np.repeat(items, n),
                "rank": np.tile(np.arange(1, n + 1), len(items)),
                "similar_item_id": self.item_ids[out_items.ravel()],
                "similarity": out_scores.ravel(),
            }
        )

    def aligned(self, user_ids: np.ndarray, item_ids: np.ndarray) -> FactorModel:
        """This model with rows for another model's id maps (any order), so it scores and
        ranks that model's rows. Ids it never saw get zero factors and biases (what `score`
        gives unknown ids); no training items (the caller sets those of the data it is
        scored on)."""
        users, items = self.user_rows(user_ids), self.item_rows(item_ids)
        return FactorModel(
            np.asarray(user_ids), np.asarray(item_ids), _rows(self.P, users),
            _rows(self.Q, items), _rows(self.bu, users), _rows(self.bi, items),
            self.global_mean, np.zeros(len(user_ids) + 1, np.int64), np.zeros(0, np.int32),
            self.rank_item_bias, self.score_min, self.score_max, self.trainer,
        )  # fmt: skip

    # --------------------------------------------------------------------------- save/load

    def save(self, uri: str) -> str:
        """model.npz and meta.json under `uri` (a folder, local or s3://), each whole or not
        at all."""
        fs, path = storage.filesystem(uri)
        buf = io.BytesIO()
        np.savez(buf, **{name: getattr(self, name) for name in _ARRAYS})
        storage.write_atomic(fs, f"{path}/model.npz", buf.getvalue())
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "global_mean": self.global_mean,
            "rank_item_bias": self.rank_item_bias,
            "score_range": [_finite(self.score_min), _finite(self.score_max)],
            "trainer": self.trainer,
            "history": [asdict(m) for m in self.history],
            "n_users": len(self.user_ids),
            "n_items": len(self.item_ids),
        }
        storage.write_atomic(fs, f"{path}/meta.json", json.dumps(meta, indent=2).encode())
        return uri

    @classmethod
    def load(cls, uri: str) -> FactorModel:
        """A saved model; also the FunkSVD files of flyray 0.x, so champions registered
        before this format still load and are scored."""
        fs, path = storage.filesystem(uri)
        with fs.open_input_stream(f"{path}/meta.json") as fh:
            meta = json.loads(fh.read())
        if (meta.get("format"), meta.get("version")) == ("flyray.funksvd", 1):
            meta = _from_funksvd_meta(meta)
        elif (meta.get("format"), meta.get("version")) != (FORMAT, FORMAT_VERSION):
            raise ValueError(
                f"{uri}: not a flyray factor model (format {FORMAT} v{FORMAT_VERSION})"
            )
        with fs.open_input_stream(f"{path}/model.npz") as fh:
            arrays = dict(np.load(io.BytesIO(fh.read()), allow_pickle=False))
        lo, hi = meta["score_range"]
        return cls(
            **arrays,
            global_mean=meta["global_mean"],
            rank_item_bias=meta["rank_item_bias"],
            score_min=-np.inf if lo is None else lo,
            score_max=np.inf if hi is None else hi,
            trainer=meta["trainer"],
            history=[EpochMetrics(**m) for m in meta["history"]],
        )


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _from_funksvd_meta(meta: dict) -> dict:
    """The format-1 FunkSVD meta.json read as this format's (biases were zero when unbiased)."""
    p = meta["params"]
    trainer = meta.get("trainer") or {"name": "funksvd", "params": p}
    if "model" in trainer:  # iALS files of 0.x: {"model": "ials", **params}
        trainer = {"name": trainer["model"], "params": {k: v for k, v in trainer.items()
                                                          if k != "model"}}  # fmt: skip
    return {
        "global_mean": meta["global_mean"] if p.get("biased", True) else 0.0,
        "rank_item_bias": p.get("rank_item_bias", True),
        "score_range": [p["rating_min"], p["rating_max"]],
        "trainer": trainer,
        "history": meta["history"],
    }
