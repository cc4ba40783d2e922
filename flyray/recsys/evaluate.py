"""Offline evaluation of recommenders on a held-out split, and the baselines to beat.

Rating metrics (RMSE, MAE) score the held-out ratings; ranking metrics (precision, recall,
NDCG, MAP at k; catalog coverage) ask whether each user's top-k unseen items contain their
held-out items. Users are scored in batches by Ray Data's map_batches over an actor pool that
holds the model once. Ranking scores every item for a user, so past `max_users` test users the
ranking metrics are computed on a seeded random sample of them (the same users for every model
evaluated on the same split): 10M events give 250k users x 100k items, 2.5e10 scores per model,
and a mean over 20k sampled users has a standard error of (per-user spread) / 141. RMSE and MAE
always use every held-out rating.

A registered champion is scored on the challenger's split by `champion_metrics`: re-indexed into
the challenger's rows (`align`), it is ranked for the same sampled users with the same seen items
excluded, so the champion gate compares two numbers measured on the same data.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import ray
from mlflow.models import Model

from flyray import console
from flyray.recsys.distributed import Ratings
from flyray.recsys.funksvd import FunkSVD, FunkSVDParams, rmse

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """Evaluation that cannot produce numbers, e.g. an empty held-out split."""


@dataclass
class Metrics:
    """One model's scores on the held-out split (NaN where a metric does not apply)."""

    model: str
    rmse: float
    mae: float
    precision: float
    recall: float
    ndcg: float
    map: float
    coverage: float
    users: int  # users the ranking metrics were computed on
    k: int
    test_users: int = 0  # users in the held-out split (users < test_users: a sample)

    def get(self, name: str) -> float:
        """A metric by the names used in configs and MLflow: rmse, ndcg@10, precision@10, ..."""
        key = name.split("@")[0].lower()
        if "@" in name and int(name.split("@")[1]) != self.k:
            raise ValueError(f"metric {name} asked, but evaluation ran at k={self.k}")
        return float(getattr(self, key))

    def as_mlflow(self) -> dict[str, float]:
        k = self.k
        return {
            "rmse": self.rmse,
            "mae": self.mae,
            f"precision_at_{k}": self.precision,
            f"recall_at_{k}": self.recall,
            f"ndcg_at_{k}": self.ndcg,
            f"map_at_{k}": self.map,
            f"coverage_at_{k}": self.coverage,
        }


def popularity_model(train: Ratings, n_users: int, n_items: int) -> FunkSVD:
    """Item popularity as a FunkSVD with no factors: every user is offered the items most users
    interacted with, so it ranks through the same code as the real model."""
    model = FunkSVD(FunkSVDParams(n_factors=1, n_epochs=0))
    model.user_ids, model.item_ids = np.arange(n_users), np.arange(n_items)
    model.P = np.zeros((n_users, 1), np.float32)
    model.Q = np.zeros((n_items, 1), np.float32)
    model.bu = np.zeros(n_users, np.float32)
    model.bi = np.bincount(train.items, minlength=n_items).astype(np.float32)
    model.set_seen(train.users, train.items)
    return model


def biases_model(train: Ratings, n_users: int, n_items: int, params: FunkSVDParams) -> FunkSVD:
    """Global mean + user and item biases, trained like the model (factors held at zero)."""
    model = FunkSVD(FunkSVDParams(**{**params.__dict__, "n_factors": 1, "init_std": 0.0}))
    model.user_ids, model.item_ids = np.arange(n_users), np.arange(n_items)
    model.fit_indexed(train.users, train.items, train.values)
    return model


def _value(x):
    """x, or the object a Ray object reference points to (the scorer runs in and out of Ray)."""
    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


class _RankingScorer:
    """Ray Data UDF: per batch of users, sums of the ranking metrics and the items shown."""

    def __init__(self, model_ref, relevant_ref, k: int):
        self.model = _value(model_ref)
        self.indptr, self.items = _value(relevant_ref)
        self.k = k
        self.discount = 1.0 / np.log2(np.arange(2, k + 2))

    def __call__(self, batch: dict) -> dict:
        rows = batch["row"].astype(np.int64)
        recs, _ = self.model.top_n_indexed(rows, self.k)
        sums = np.zeros(4)
        ndcg = np.zeros(len(rows))
        for n, row in enumerate(rows):
            relevant = self.items[self.indptr[row] : self.indptr[row + 1]]
            hits = np.isin(recs[n], relevant)
            found = hits.sum()
            ideal = self.discount[: min(len(relevant), self.k)].sum()
            precision_at = np.cumsum(hits) / np.arange(1, self.k + 1)
            ndcg[n] = (hits * self.discount[: len(hits)]).sum() / ideal
            sums += (
                found / self.k,
                found / len(relevant),
                ndcg[n],
                (precision_at * hits).sum() / min(len(relevant), self.k),
            )
        return {"sums": sums[None, :], "users": np.array([len(rows)]), "shown": [np.unique(recs)],
                "ndcg": [ndcg]}  # fmt: skip


def evaluate(
    model: FunkSVD,
    test: Ratings,
    k: int = 10,
    name: str = "funksvd",
    rating_metrics: bool = True,
    batch_size: int = 1024,
    max_users: int = 20_000,
    seed: int = 0,
) -> Metrics:
    """Score `model` on held-out ratings (dense rows shared with the model); ranking metrics on
    at most `max_users` users (a seeded sample; 0 = every user)."""
    if len(test) == 0:
        raise EvaluationError("the test split is empty: nothing to evaluate (more data or a "
                              "larger test_fraction)")  # fmt: skip
    preds = model._predict_indexed(test.users, test.items) if rating_metrics else None
    all_users, users, relevant = _ranked_users(model, test, max_users, seed)
    if not ray.is_initialized():
        ray.init()
    workers = max(1, int(ray.available_resources().get("CPU", 1)))
    ds = ray.data.from_arrow(pa.table({"row": users.astype(np.int64)}))
    out = ds.map_batches(
        _RankingScorer,
        fn_constructor_kwargs={
            "model_ref": ray.put(model),
            "relevant_ref": ray.put(relevant),
            "k": k,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=min(workers, max(1, math.ceil(len(users) / batch_size)))
        ),
        batch_format="numpy",
    )
    batches = math.ceil(len(users) / batch_size)
    out = list(console.progress(out.iter_rows(), total=batches, desc=f"evaluating {name}"))
    sums = np.sum([row["sums"] for row in out], axis=0)
    n_users = int(sum(row["users"] for row in out))
    shown = np.unique(np.concatenate([row["shown"] for row in out]))
    metrics = Metrics(
        model=name,
        rmse=rmse(preds, test.values) if preds is not None else float("nan"),
        mae=float(np.mean(np.abs(preds - test.values))) if preds is not None else float("nan"),
        precision=float(sums[0] / n_users),
        recall=float(sums[1] / n_users),
        ndcg=float(sums[2] / n_users),
        map=float(sums[3] / n_users),
        coverage=len(shown) / len(model.item_ids),
        users=n_users,
        k=k,
        test_users=len(all_users),
    )
    log.info("evaluation of %s: %s", name, metrics)
    return metrics


def _ranked_users(model: FunkSVD, test: Ratings, max_users: int, seed: int):
    """(every test user, the seeded sample ranked, CSR of each user's held-out items)."""
    order = np.argsort(test.users, kind="stable")
    all_users = np.unique(test.users)
    users = all_users
    if 0 < max_users < len(all_users):
        users = np.sort(np.random.default_rng(seed).choice(all_users, max_users, replace=False))
    counts = np.bincount(test.users, minlength=len(model.user_ids))
    indptr = np.concatenate(([0], np.cumsum(counts)))
    return all_users, users, (indptr, test.items[order].astype(np.int64))


def ndcg_in_process(
    model: FunkSVD, test: Ratings, k: int = 10, max_users: int = 5_000, seed: int = 0
) -> float:
    """NDCG@k as `evaluate` computes it, in this process (no Ray Data)."""
    return ndcg_with_error(model, test, k, max_users, seed)[0]


def ndcg_with_error(
    model: FunkSVD, test: Ratings, k: int = 10, max_users: int = 5_000, seed: int = 0
) -> tuple[float, float]:
    """(NDCG@k, its standard error over the users ranked), in this process: what a tuning trial
    reports after every epoch from inside its own Ray task. The error says how far apart two
    scores must be before the difference is more than the luck of which users were held out."""
    ndcg = ndcg_per_user(model, test, k, max_users, seed)
    error = ndcg.std(ddof=1) / np.sqrt(len(ndcg)) if len(ndcg) > 1 else 0.0
    return float(ndcg.mean()), float(error)


def ndcg_per_user(
    model: FunkSVD, test: Ratings, k: int = 10, max_users: int = 5_000, seed: int = 0
) -> np.ndarray:
    """NDCG@k of each user ranked (the seeded sample, in user order), in this process: two
    models' arrays on the same test split compare user by user (a paired difference)."""
    if len(test) == 0:
        raise EvaluationError("the validation split is empty: nothing to tune on")
    _, users, relevant = _ranked_users(model, test, max_users, seed)
    scorer = _RankingScorer(model, relevant, k)
    return np.concatenate(
        [scorer({"row": users[s : s + 1024]})["ndcg"][0] for s in range(0, len(users), 1024)]
    )


def _rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values[rows], zeros where a row is -1 (an id the model never saw)."""
    out = np.zeros((len(rows), *values.shape[1:]), values.dtype)
    known = rows >= 0
    out[known] = values[rows[known]]
    return out


def align(model: FunkSVD, user_ids: np.ndarray, item_ids: np.ndarray) -> FunkSVD:
    """`model` with rows for `user_ids` x `item_ids` (another model's id maps, any order), so it
    scores and ranks the other model's dense rows. Ids it never saw get zero factors and biases,
    i.e. what its own `predict` gives unknown ids. No seen items: the caller sets the ones of the
    data it is scored on (set_seen)."""
    users = pd.Index(model.user_ids).get_indexer(user_ids)
    items = pd.Index(model.item_ids).get_indexer(item_ids)
    out = FunkSVD(model.params)
    out.user_ids, out.item_ids = np.asarray(user_ids), np.asarray(item_ids)
    out.P, out.bu = _rows(model.P, users), _rows(model.bu, users)
    out.Q, out.bi = _rows(model.Q, items), _rows(model.bi, items)
    out.global_mean = model.global_mean
    out.set_seen(np.zeros(0, np.int32), np.zeros(0, np.int32))
    return out


def champion_metrics(
    model_uri: str, challenger: FunkSVD, train: Ratings, test: Ratings, k: int, max_users: int
) -> Metrics:
    """The registered model at `model_uri` (a pyfunc of `flyray.recsys.pyfunc.log_pyfunc`) scored
    as the challenger is: on its test split (dense rows of its id maps), its training items
    excluded from the rankings, the same sampled users; champion and challenger are trained on
    different data windows, so their own metrics are not comparable."""
    artifact = Model.load(model_uri).flavors["python_function"]["artifacts"]["model"]["path"]
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model_uri}/{artifact}", dst_path=tmp
        )
        champion = align(FunkSVD.load(local), challenger.user_ids, challenger.item_ids)
    champion.set_seen(train.users, train.items)
    return evaluate(champion, test, k, "champion", max_users=max_users)
