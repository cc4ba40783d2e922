"""The baselines a recommender must beat, as factor models ranked by the same code.

Popularity scores item i by n_i, the number of training users who interacted with it (no
fitting: no objective, no update). Biases is FunkSVD with the factors held at zero,

    r_ui ~ mu + b_u + b_i,  minimising  sum (r_ui - mu - b_u - b_i)^2 + reg (b_u^2 + b_i^2)

by the same SGD steps (b_u += lr (e - reg b_u), b_i += lr (e - reg b_i)), negatives included,
so it shows what the factors add beyond user and item offsets.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from flyray.recsys.funksvd import FunkSVD, FunkSVDParams
from flyray.recsys.model import FactorModel, Ratings


def popularity(train: Ratings, n_users: int, n_items: int) -> FactorModel:
    """Every user is offered the items most users interacted with (unseen ones first)."""
    model = FactorModel.empty(np.arange(n_users), np.arange(n_items), 1, score_min=0.0,
                              trainer={"name": "popularity", "params": {}})  # fmt: skip
    model.bi = np.bincount(train.items, minlength=n_items).astype(np.float32)
    return model.set_seen(train.users, train.items)


def biases(train: Ratings, n_users: int, n_items: int, params: FunkSVDParams) -> FactorModel:
    """Global mean + user and item biases, trained like the model (factors held at zero)."""
    fixed = replace(params, n_factors=1, init_std=0.0, biased=True)
    model = FunkSVD(fixed).fit_indexed(train.users, train.items, train.values,
                                       np.arange(n_users), np.arange(n_items))  # fmt: skip
    model.trainer = {"name": "biases", "params": model.trainer["params"]}
    return model
