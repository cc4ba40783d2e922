"""Ranking and rating metrics on a case small enough to work out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flyray.recsys import FactorModel, Ratings, baselines
from flyray.recsys.evaluate import EvaluationError, evaluate


def _fixed_model(item_scores: list[float], n_users: int) -> FactorModel:
    """Every user ranks items by item_scores (biases only); user 0 has seen item 0."""
    model = FactorModel.empty(np.arange(n_users), np.arange(len(item_scores)), 1,
                              score_min=0.0, score_max=10.0)  # fmt: skip
    model.bi = np.array(item_scores, np.float32)
    model.set_seen(np.array([0]), np.array([0]))
    return model


def test_metrics_match_hand_computation():
    # Ranking for user 0 (item 0 seen): 1, 2, 3, 4; for user 1: 0, 1, 2, 3.
    model = _fixed_model([5.0, 4.0, 3.0, 2.0, 1.0], n_users=2)
    test = Ratings(np.array([0, 0, 1]), np.array([2, 4, 3]), np.array([3.0, 1.0, 2.0]))
    m = evaluate(model, test, k=2)
    # user 0: top-2 = [1, 2], relevant {2, 4}: 1 hit at rank 2. user 1: top-2 = [0, 1], rel {3}.
    assert m.users == 2
    assert m.precision == pytest.approx((1 / 2 + 0) / 2)
    assert m.recall == pytest.approx((1 / 2 + 0) / 2)
    ndcg_u0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m.ndcg == pytest.approx(ndcg_u0 / 2)
    assert m.map == pytest.approx(((1 / 2) / 2) / 2)
    assert m.coverage == pytest.approx(3 / 5)  # items 0, 1, 2 shown
    preds = np.array([3.0, 1.0, 2.0])  # biases predict item score + global mean 0
    want = np.sqrt(np.mean((np.array([3.0, 1.0, 2.0]) - preds) ** 2))
    assert m.rmse == pytest.approx(want, abs=1e-6)


def test_popularity_ranks_by_interactions_and_empty_test_is_an_error():
    train = Ratings(np.array([0, 1, 2, 0]), np.array([3, 3, 3, 1]), np.ones(4))
    pop = baselines.popularity(train, 4, 5)
    items, _ = pop.top_n_indexed(np.array([3]), 2)
    assert items[0].tolist() == [3, 1]
    with pytest.raises(EvaluationError, match="test split is empty"):
        evaluate(pop, Ratings(np.zeros(0), np.zeros(0), np.zeros(0)))


def _random_model(n_users: int, n_items: int, seed: int = 0) -> tuple[FactorModel, Ratings]:
    """Random factors and a random held-out split in which every user has 3 items."""
    rng = np.random.default_rng(seed)
    model = FactorModel.empty(np.arange(n_users), np.arange(n_items), 4)
    model.P = rng.normal(0, 1, (n_users, 4)).astype(np.float32)
    model.Q = rng.normal(0, 1, (n_items, 4)).astype(np.float32)
    model.bu, model.bi = np.zeros(n_users, np.float32), np.zeros(n_items, np.float32)
    model.set_seen(np.arange(n_users), rng.integers(0, n_items, n_users))
    users = np.repeat(np.arange(n_users), 3)
    return model, Ratings(users, rng.integers(0, n_items, len(users)), np.ones(len(users)))


def test_ranking_metrics_on_a_seeded_sample_of_users():
    model, test = _random_model(3000, 200)
    full = evaluate(model, test, k=10, max_users=0)
    sample = evaluate(model, test, k=10, max_users=1000)
    again = evaluate(model, test, k=10, max_users=1000)
    assert (full.users, full.test_users) == (3000, 3000)
    assert (sample.users, sample.test_users) == (1000, 3000)
    assert sample == again  # the same users every time
    assert sample.rmse == full.rmse  # rating metrics use every held-out rating
    assert sample.ndcg == pytest.approx(full.ndcg, abs=0.02) and sample.ndcg != full.ndcg


def test_top_n_is_the_same_whatever_block_of_scores_is_ranked_at_once(monkeypatch):
    import flyray.recsys.model as factor_model

    model, _ = _random_model(500, 300)
    rows = np.array([*range(500), -1])  # -1: an unknown user
    want = model.top_n_indexed(rows, 7)
    monkeypatch.setattr(factor_model, "_SCORE_BLOCK", 300 * 3)  # 3 users at a time
    got = model.top_n_indexed(rows, 7)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
