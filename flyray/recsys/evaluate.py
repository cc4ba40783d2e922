"""Offline evaluation of recommenders on a held-out split.

Rating metrics (RMSE, MAE) score the held-out ratings; ranking metrics (precision, recall,
NDCG, MAP at k; catalog coverage) ask whether each user's top-k unseen items contain their
held-out items. Ranking is the model's own `top_n_indexed` (BLAS products in blocks, a compiled
selection) and the metrics a compiled kernel over users (flyray.recsys.kernels), in this
process: at the sizes ranked here the work is a few matrix products, which a Ray Data actor
pool only slowed down (its start and a Python loop per user took 8.5 s per model at 1M events).
Ranking scores every item for a user, so past `max_users` test users the ranking metrics are
computed on a seeded random sample of them (the same users for every model evaluated on the
same split): 10M events give 250k users x 100k items, and a mean over 20k sampled users has a
standard error of (per-user spread) / 141. RMSE and MAE always use every held-out rating.

A registered champion is scored on the challenger's split by `champion_metrics`: re-indexed into
the challenger's rows (`FactorModel.aligned`), it is ranked for the same sampled users with the
same seen items excluded, so the champion gate compares two numbers measured on the same data.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow.models import Model

from flyray.recsys import kernels
from flyray.recsys.funksvd import rmse
from flyray.recsys.model import FactorModel, Ratings, seen_csr

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


def evaluate(
    model: FactorModel,
    test: Ratings,
    k: int = 10,
    name: str = "",
    rating_metrics: bool = True,
    max_users: int = 20_000,
    seed: int = 0,
) -> Metrics:
    """Score `model` on held-out ratings (dense rows shared with the model); ranking metrics on
    at most `max_users` users (a seeded sample; 0 = every user)."""
    if len(test) == 0:
        raise EvaluationError("the test split is empty: nothing to evaluate (more data or a "
                              "larger test_fraction)")  # fmt: skip
    preds = model.score_indexed(test.users, test.items) if rating_metrics else None
    all_users, per_user, shown = _ranking(model, test, k, max_users, seed)
    means = per_user.mean(axis=0)
    metrics = Metrics(
        model=name or model.name,
        rmse=rmse(preds, test.values) if preds is not None else float("nan"),
        mae=float(np.mean(np.abs(preds - test.values))) if preds is not None else float("nan"),
        precision=float(means[0]),
        recall=float(means[1]),
        ndcg=float(means[2]),
        map=float(means[3]),
        coverage=len(shown) / len(model.item_ids),
        users=len(per_user),
        k=k,
        test_users=len(all_users),
    )
    log.info("evaluation of %s: %s", metrics.model, metrics)
    return metrics


def _ranking(model: FactorModel, test: Ratings, k: int, max_users: int, seed: int):
    """(every test user, per sampled user [precision, recall, NDCG, AP] at k, items shown)."""
    all_users = np.unique(test.users)
    users = all_users
    if 0 < max_users < len(all_users):
        users = np.sort(np.random.default_rng(seed).choice(all_users, max_users, replace=False))
    indptr, relevant = seen_csr(test.users, test.items, len(model.user_ids))
    rows = users.astype(np.int64)
    recs, _ = model.top_n_indexed(rows, k)
    per_user = kernels.ranking_metrics(recs, rows, indptr, relevant)
    return all_users, per_user, np.unique(recs[recs >= 0])


def ndcg_with_error(
    model: FactorModel, test: Ratings, k: int = 10, max_users: int = 5_000, seed: int = 0
) -> tuple[float, float]:
    """(NDCG@k, its standard error over the users ranked): what a tuning trial reports after
    every epoch. The error says how far apart two scores must be before the difference is
    more than the luck of which users were held out."""
    ndcg = ndcg_per_user(model, test, k, max_users, seed)
    error = ndcg.std(ddof=1) / np.sqrt(len(ndcg)) if len(ndcg) > 1 else 0.0
    return float(ndcg.mean()), float(error)


def ndcg_per_user(
    model: FactorModel, test: Ratings, k: int = 10, max_users: int = 5_000, seed: int = 0
) -> np.ndarray:
    """NDCG@k of each user ranked (the seeded sample, in user order): two models' arrays on
    the same test split compare user by user (a paired difference)."""
    if len(test) == 0:
        raise EvaluationError("the validation split is empty: nothing to tune on")
    return _ranking(model, test, k, max_users, seed)[1][:, 2]


def champion_metrics(
    model_uri: str, challenger: FactorModel, train: Ratings, test: Ratings, k: int, max_users: int
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
        champion = FactorModel.load(local).aligned(challenger.user_ids, challenger.item_ids)
    champion.set_seen(train.users, train.items)
    return evaluate(champion, test, k, "champion", max_users=max_users)
