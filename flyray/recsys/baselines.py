"""The baselines a recommender must beat, as factor models ranked by the same code.

Popularity scores item i by n_i, the number of training users who interacted with it (no
fitting: no objective, no update). Biases is Surprise's BaselineOnly: the factors held at zero,

    r_ui ~ mu + b_u + b_i,  minimising  sum (r_ui - mu - b_u - b_i)^2 + reg_u b_u^2 + reg_i b_i^2

over the ratings plus the model's negatives (the same sampler, one draw), by alternating least
squares with Surprise's defaults (10 sweeps, reg_u 15, reg_i 10): each sweep solves every b_u
with the b_i fixed, then every b_i with the b_u fixed,

    b_u = sum_{i in R(u)} (r_ui - mu - b_i) / (reg_u + |R(u)|)
    b_i = sum_{u in R(i)} (r_ui - mu - b_u) / (reg_i + |R(i)|)

so it shows what the factors add beyond user and item offsets, fitted to convergence in a
fraction of a second (the model's own SGD took 3-5 s of `evaluate_model` at 1M events).
"""

from __future__ import annotations

import numpy as np

from flyray.recsys.funksvd import FunkSVDParams, TrainingSet, negative_weights
from flyray.recsys.model import FactorModel, Ratings

REG_U, REG_I, SWEEPS = 15.0, 10.0, 10  # Surprise's BaselineOnly defaults (bsl_options)


def popularity(train: Ratings, n_users: int, n_items: int) -> FactorModel:
    """Every user is offered the items most users interacted with (unseen ones first)."""
    model = FactorModel.empty(np.arange(n_users), np.arange(n_items), 1, score_min=0.0,
                              trainer={"name": "popularity", "params": {}})  # fmt: skip
    model.bi = np.bincount(train.items, minlength=n_items).astype(np.float32)
    return model.set_seen(train.users, train.items)


def biases(train: Ratings, n_users: int, n_items: int, params: FunkSVDParams) -> FactorModel:
    """Global mean + user and item biases by ALS, on the ratings and negatives the model saw."""
    weights = negative_weights(train.items, n_items, params.negative_beta)
    data = TrainingSet(train.users, train.items, train.values, n_users, weights, params).at(1)
    u, i, r = data.users, data.items, data.ratings.astype(np.float64)
    mu = float(r.mean())
    per_user = REG_U + np.bincount(u, minlength=n_users)
    per_item = REG_I + np.bincount(i, minlength=n_items)
    bu, bi = np.zeros(n_users), np.zeros(n_items)
    for _ in range(SWEEPS):
        bu = np.bincount(u, r - mu - bi[i], n_users) / per_user
        bi = np.bincount(i, r - mu - bu[u], n_items) / per_item
    model = FactorModel.empty(
        np.arange(n_users), np.arange(n_items), 1, global_mean=mu,
        score_min=params.rating_min, score_max=params.rating_max,
        trainer={"name": "biases", "params": {"reg_u": REG_U, "reg_i": REG_I, "sweeps": SWEEPS,
                                              "negatives": params.negatives}},
    )  # fmt: skip
    model.bu, model.bi = bu.astype(np.float32), bi.astype(np.float32)
    return model.set_seen(train.users, train.items)
