"""The recommender's trainers by name: the workflow's `model` input picks one, and each
produces a FactorModel (flyray.recsys.model), so nothing downstream asks which one ran.

    funksvd   biased matrix factorisation by SGD (flyray.recsys.funksvd), DSGD over Ray actors
              (flyray.recsys.distributed)
    ials      implicit ALS (flyray.recsys.ials), rows solved over Ray actors

The baselines (popularity, biases) are trainers too, fitted by the evaluation
(flyray.recsys.baselines).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from flyray.raytrain import DistributedConfig
from flyray.recsys import distributed, ials
from flyray.recsys.funksvd import FunkSVD, FunkSVDParams
from flyray.recsys.ials import IALSParams
from flyray.recsys.model import FactorModel, Ratings

MODELS = ("funksvd", "ials")
OnEpoch = Callable[[FactorModel, int], None] | None


def check(model: str) -> str:
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    return model


def params_of(model: str, funksvd: FunkSVDParams, ials_params: IALSParams):
    """The hyperparameters of the trainer `model` picks."""
    return {"funksvd": funksvd, "ials": ials_params}[check(model)]


def _funksvd_local(train: Ratings, n_users: int, n_items: int, params, on_epoch: OnEpoch):
    return FunkSVD(params).fit_indexed(train.users, train.items, train.values,
                                       np.arange(n_users), np.arange(n_items),
                                       on_epoch=on_epoch)  # fmt: skip


def fit_local(model: str, train: Ratings, n_users: int, n_items: int, params,
              on_epoch: OnEpoch = None) -> FactorModel:  # fmt: skip
    """Train in this process (a tuning trial on its CPU), `on_epoch` after every epoch."""
    local = {"funksvd": _funksvd_local, "ials": ials.fit_local}[check(model)]
    return local(train, n_users, n_items, params, on_epoch)


def fit(model: str, train: Ratings, validation: Ratings, user_ids: np.ndarray,
        item_ids: np.ndarray, params, config: DistributedConfig) -> FactorModel:  # fmt: skip
    """Train over Ray actors on the running cluster, checkpointed and resumable."""
    n_users, n_items = len(user_ids), len(item_ids)
    if check(model) == "ials":
        return ials.train(train, n_users, n_items, params, config, user_ids, item_ids)
    return distributed.train(train, n_users, n_items, params, config, validation, user_ids,
                             item_ids)  # fmt: skip
