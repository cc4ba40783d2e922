"""FunkSVD, the SGD trainer: the compiled kernel against a reference, accuracy, its model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flyray.recsys import FactorModel, FunkSVD, FunkSVDParams
from flyray.recsys.funksvd import VisitOrder, init_factors, rmse


def synthetic(n_users=400, n_items=200, n=30_000, noise=0.3, seed=0):
    """Explicit ratings from known latent factors (ground truth), on a 1-5 scale."""
    rng = np.random.default_rng(seed)
    pt, qt = rng.normal(0, 0.6, (n_users, 5)), rng.normal(0, 0.6, (n_items, 5))
    bu, bi = rng.normal(0, 0.3, n_users), rng.normal(0, 0.3, n_items)
    u, i = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    r = np.clip(3.2 + bu[u] + bi[i] + (pt[u] * qt[i]).sum(1) + rng.normal(0, noise, n), 1, 5)
    return pd.DataFrame({"user_id": u * 10 + 7, "item_id": i * 3 + 1000, "rating": r})


def reference_sgd(users, items, ratings, params, n_users, n_items, n_epochs):
    """Plain-Python SGD in float32, update by update: the compiled kernel must match it."""
    P, Q, bu, bi = init_factors(params, n_users, n_items)
    mean = np.float32(np.mean(ratings, dtype=np.float64))
    lr, reg = np.float32(params.lr), np.float32(params.reg)
    visit = VisitOrder(users, params)
    for epoch in range(1, n_epochs + 1):
        for idx in visit(epoch):
            u, i = users[idx], items[idx]
            dot = np.float32(0)
            for f in range(params.n_factors):
                dot += P[u, f] * Q[i, f]
            err = np.float32(ratings[idx] - ((dot + mean) + (bu[u] + bi[i])))
            bu[u] += lr * (err - reg * bu[u])
            bi[i] += lr * (err - reg * bi[i])
            for f in range(params.n_factors):
                puf, qif = P[u, f], Q[i, f]
                P[u, f] = puf + lr * (err * qif - reg * puf)
                Q[i, f] = qif + lr * (err * puf - reg * qif)
    return P, Q, bu, bi


def test_kernel_matches_reference_sgd():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 6, 40).astype(np.int32)
    items = rng.integers(0, 5, 40).astype(np.int32)
    ratings = rng.uniform(1, 5, 40).astype(np.float32)
    params = FunkSVDParams(n_factors=4, n_epochs=3, lr=0.05, reg=0.1, seed=3)
    model = FunkSVD(params).fit_indexed(users, items, ratings)
    assert (len(model.user_ids), len(model.item_ids)) == (6, 5)
    P, Q, bu, bi = reference_sgd(users, items, ratings, params, 6, 5, 3)
    for got, want in ((model.P, P), (model.Q, Q), (model.bu, bu), (model.bi, bi)):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert np.abs(model.P - init_factors(params, 6, 5)[0]).max() > 1e-3  # it did learn


def test_each_epoch_visits_every_rating_once_user_by_user_in_a_seeded_order():
    users = np.random.default_rng(2).integers(0, 50, 2_000).astype(np.int32)
    visit = VisitOrder(users, FunkSVDParams(seed=4))
    first = visit(1).copy()
    assert np.array_equal(np.sort(first), np.arange(len(users)))  # every rating, once
    runs = users[first][np.r_[True, np.diff(users[first]) != 0]]
    assert len(runs) == len(np.unique(users))  # each user's ratings together
    assert all(np.all(np.diff(first[users[first] == u]) > 0) for u in runs[:5])  # in file order
    second = visit(2).copy()
    assert not np.array_equal(first, second)  # users come in a fresh order each epoch
    assert np.array_equal(VisitOrder(users, FunkSVDParams(seed=4))(2), second)  # seeded


def test_converges_far_beyond_biases_on_ground_truth():
    data = synthetic()
    train, test = data.iloc[:25_000], data.iloc[25_000:]
    model = FunkSVD(n_factors=20, n_epochs=30, lr=0.01, reg=0.05).fit(train, validation=test)
    biases = FunkSVD(n_factors=1, n_epochs=30, lr=0.01, reg=0.05, init_std=0.0).fit(train)

    def rmse(m):
        return float(np.sqrt(np.mean((m.score(test.user_id, test.item_id) - test.rating) ** 2)))  # noqa: E731

    assert rmse(model) < 0.55 < rmse(biases) - 0.1
    assert model.history[-1].validation_rmse == pytest.approx(rmse(model), abs=1e-4)
    curve = [h.train_rmse for h in model.history]
    assert curve[-1] < curve[0]


def test_unknown_users_and_items_fall_back_to_biases():
    data = synthetic(n=5_000)
    model = FunkSVD(n_factors=8, n_epochs=5).fit(data)
    known_user, known_item = int(data.user_id[0]), int(data.item_id[0])
    u_row = np.searchsorted(model.user_ids, known_user)
    i_row = np.searchsorted(model.item_ids, known_item)
    preds = model.score([known_user, -5, known_user, -5], [-9, known_item, known_item, -9])
    mean = model.global_mean
    np.testing.assert_allclose(preds[0], np.clip(mean + model.bu[u_row], 1, 5), rtol=1e-5)
    np.testing.assert_allclose(preds[1], np.clip(mean + model.bi[i_row], 1, 5), rtol=1e-5)
    np.testing.assert_allclose(preds[3], np.clip(mean, 1, 5), rtol=1e-5)
    assert ((preds >= 1) & (preds <= 5)).all()


def test_recommend_never_returns_seen_items_and_ranks_by_score():
    data = synthetic(n=8_000)
    model = FunkSVD(n_factors=8, n_epochs=5).fit(data)
    users = np.unique(data.user_id)[:50]
    recs = model.recommend(users, n=15)
    assert len(recs) == 50 * 15
    seen = data.groupby("user_id")["item_id"].apply(set)
    for user, group in recs.groupby("user_id"):
        assert not set(group.item_id) & seen[user]
        assert group["rank"].tolist() == list(range(1, 16))
        assert (np.diff(group.score.to_numpy()) <= 1e-6).all()
        want = model.score(np.full(15, user), group.item_id.to_numpy())
        np.testing.assert_allclose(group.score, want, rtol=1e-4)
    cold = model.recommend([-1], n=5, filter_seen=True)
    top_bias = model.item_ids[np.argsort(-model.bi)[:5]]
    assert cold.item_id.tolist() == top_bias.tolist()


def test_save_load_round_trip(tmp_path):
    data = synthetic(n=5_000)
    model = FunkSVD(n_factors=6, n_epochs=4, seed=5).fit(data)
    model.save(str(tmp_path / "m"))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["meta.json", "model.npz"]
    loaded = FactorModel.load(str(tmp_path / "m"))
    assert loaded.trainer == model.trainer and len(loaded.history) == 4
    assert loaded.trainer["params"]["seed"] == 5
    np.testing.assert_array_equal(loaded.P, model.P)
    users, items = data.user_id[:100].to_numpy(), data.item_id[:100].to_numpy()
    np.testing.assert_array_equal(loaded.score(users, items), model.score(users, items))
    pd.testing.assert_frame_equal(loaded.recommend(users[:5]), model.recommend(users[:5]))
    (tmp_path / "m" / "meta.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a flyray factor model"):
        FactorModel.load(str(tmp_path / "m"))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="lacks columns"):
        FunkSVD().fit(pd.DataFrame({"user_id": [1], "item_id": [2]}))
    with pytest.raises(ValueError, match="no ratings"):
        FunkSVD().fit(pd.DataFrame({"user_id": [], "item_id": [], "rating": []}))
    with pytest.raises(ValueError, match="NaN"):
        FunkSVD().fit(([1, 2], [1, 2], [1.0, np.nan]))
    with pytest.raises(ValueError, match="n_factors"):
        FunkSVDParams(n_factors=0)


def test_kernel_rmse_helper_agrees_with_numpy():
    data = synthetic(n=3_000)
    model = FunkSVD(n_factors=4, n_epochs=2).fit(data)
    u = np.searchsorted(model.user_ids, data.user_id.to_numpy())
    i = np.searchsorted(model.item_ids, data.item_id.to_numpy())
    want = np.sqrt(np.mean((model.score(data.user_id, data.item_id) - data.rating) ** 2))
    got = rmse(model.score_indexed(u, i), data.rating.to_numpy())
    assert got == pytest.approx(want, rel=1e-5)
