"""Implicit ALS: the CG kernel against the dense closed form, Ray workers against one worker,
checkpoints and resume, ranking quality, and the factor-model files that serve it."""

from __future__ import annotations

import numpy as np
import pytest

from flyray.raytrain import DistributedConfig
from flyray.recsys import FactorModel, baselines, ials, kernels
from flyray.recsys.evaluate import evaluate
from flyray.recsys.ials import IALSParams, Rows, gramian
from flyray.recsys.model import Ratings


def taste_clicks(n_users=400, n_items=150, per_user=15, seed=0):
    """Clicks from latent tastes plus popularity, with strengths on a 1-5 scale."""
    rng = np.random.default_rng(seed)
    tu, ti = rng.normal(0, 1, (n_users, 4)), rng.normal(0, 1, (n_items, 4))
    logits = 1.5 * tu @ ti.T + np.log(1.0 / np.arange(1, n_items + 1))[None, :]
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    u = np.repeat(np.arange(n_users), per_user)
    i = np.array([rng.choice(n_items, p=prob[x]) for x in u])
    pairs, counts = np.unique(u * n_items + i, return_counts=True)
    r = np.minimum(1.0 + counts, 5.0).astype(np.float32)
    return Ratings(pairs // n_items, pairs % n_items, r)


def dense_solution(X, Y, rows, cols, conf, reg):
    """Each row's exact minimiser, from the full normal equations (no Gramian trick)."""
    out = np.empty(X.shape, np.float64)
    Y = Y.astype(np.float64)
    for u in range(len(X)):
        c = np.ones(len(Y))
        p = np.zeros(len(Y))
        c[cols[rows == u]] += conf[rows == u]
        p[cols[rows == u]] = 1.0
        A = (Y.T * c) @ Y + reg * np.eye(Y.shape[1])
        out[u] = np.linalg.solve(A, Y.T @ (c * p))
    return out


def test_cg_solve_matches_the_dense_closed_form():
    rng = np.random.default_rng(0)
    n_users, n_items, k = 30, 25, 6
    data = taste_clicks(n_users, n_items, per_user=6)
    rows, cols, conf = data.users, data.items, 4.0 * data.values
    X = rng.normal(0, 0.1, (n_users, k)).astype(np.float32)
    Y = rng.normal(0, 0.5, (n_items, k)).astype(np.float32)
    expected = dense_solution(X, Y, rows, cols, conf, reg=0.1)
    side = Rows(rows, cols, conf, n_users)
    solved, _ = side.solve(X, Y, gramian(Y, 0.1), cg_steps=k)  # CG is exact in k steps
    np.testing.assert_allclose(solved, expected, rtol=1e-3, atol=1e-4)
    few, _ = side.solve(X, Y, gramian(Y, 0.1), cg_steps=2)  # a few steps already get close
    assert np.abs(few - expected).max() < np.abs(X - expected).max() / 2


def test_cg_residual_is_zero_when_solved():
    data = taste_clicks(20, 15, per_user=5)
    rng = np.random.default_rng(1)
    X, Y = (
        rng.normal(0, 0.1, (20, 3)).astype(np.float32),
        rng.normal(0, 0.5, (15, 3)).astype(np.float32),
    )
    side = Rows(data.users, data.items, data.values, 20)
    left = kernels.ials_solve(side.indptr, side.indices, side.values, X, Y, gramian(Y, 0.5), 3)
    again = kernels.ials_solve(side.indptr, side.indices, side.values, X, Y, gramian(Y, 0.5), 3)
    assert again < 1e-6 < left or left < 1e-6


@pytest.mark.e2e
def test_local_fit_ranks_held_out_clicks_far_above_popularity():
    data = taste_clicks(seed=2)
    rng = np.random.default_rng(0)
    held = rng.random(len(data)) < 0.2
    train_r = Ratings(data.users[~held], data.items[~held], data.values[~held])
    test_r = Ratings(data.users[held], data.items[held], data.values[held])
    model = ials.fit_local(train_r, 400, 150, IALSParams(n_factors=16, n_epochs=8, reg=0.1))
    losses = [h.train_rmse for h in model.history]
    assert losses[-1] < losses[0]
    ours = evaluate(model, test_r, 10, "ials", rating_metrics=False).ndcg
    popular = evaluate(baselines.popularity(train_r, 400, 150), test_r, 10, "pop", False).ndcg
    assert ours > 1.3 * popular


@pytest.fixture(scope="module")
def clicks():
    return taste_clicks(seed=3)


def _train(data, params, **cfg):
    return ials.train(data, 400, 150, params, DistributedConfig(**cfg))


PARAMS = IALSParams(n_factors=12, n_epochs=4, reg=0.05, alpha=5.0)


@pytest.mark.usefixtures("ray_cluster")
def test_two_workers_give_the_factors_of_one(clicks):
    one = _train(clicks, PARAMS, workers=1)
    two = _train(clicks, PARAMS, workers=2)
    np.testing.assert_allclose(two.P, one.P, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(two.Q, one.Q, rtol=1e-4, atol=1e-5)
    assert sum(w["ratings"] for w in two.history[-1].workers) == len(clicks)
    local = ials.fit_local(clicks, 400, 150, PARAMS)
    np.testing.assert_allclose(local.Q, one.Q, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("ray_cluster")
def test_resume_continues_from_the_last_checkpoint(clicks, tmp_path):
    uri = str(tmp_path / "ckpt")
    short = IALSParams(**{**PARAMS.__dict__, "n_epochs": 2})
    first = _train(clicks, short, workers=2, checkpoint_uri=uri)
    assert first.resumed_from_epoch == 0
    cont = _train(clicks, PARAMS, workers=2, checkpoint_uri=uri)
    assert cont.resumed_from_epoch == 2
    assert [h.seconds for h in cont.history[:2]] == [h.seconds for h in first.history]
    uninterrupted = _train(clicks, PARAMS, workers=1)
    np.testing.assert_allclose(cont.P, uninterrupted.P, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="different training"):
        _train(clicks, IALSParams(**{**PARAMS.__dict__, "alpha": 1.0}), checkpoint_uri=uri)


def test_fitted_model_is_saved_and_ranked_as_a_factor_model(clicks, tmp_path):
    model = ials.fit_local(clicks, 400, 150, PARAMS)
    loaded = FactorModel.load(model.save(str(tmp_path / "model")))
    assert loaded.name == "ials" and loaded.trainer["params"]["alpha"] == PARAMS.alpha
    assert not loaded.bu.any() and not loaded.bi.any() and loaded.global_mean == 0.0
    top = loaded.recommend([0, 1], n=5)
    scores = loaded.P[[0, 1]] @ loaded.Q.T
    for user, frame in top.groupby("user_id"):
        seen = set(clicks.items[clicks.users == user].tolist())
        ranked = [i for i in np.argsort(-scores[user]) if i not in seen][:5]
        assert frame.item_id.tolist() == ranked
    pair = loaded.score([0], [int(top.item_id[0])])[0]
    assert 0.0 <= pair <= 1.0


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        IALSParams(alpha=0)


@pytest.mark.e2e
def test_registered_pyfunc_serves_an_ials_model(clicks, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from flyray.recsys.pyfunc import log_pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = ials.fit_local(clicks, 400, 150, PARAMS)
    folder = model.save(str(tmp_path / "ials"))
    # Its own experiment (an earlier test's active experiment id lives in MLflow's globals), with
    # its artifacts under tmp_path (sqlite's default artifact root is ./mlruns in the checkout).
    artifacts = (tmp_path / "artifacts").as_uri()
    with mlflow.start_run(experiment_id=mlflow.create_experiment("ials-pyfunc", artifacts)):
        info = log_pyfunc(model, folder)
    served = mlflow.pyfunc.load_model(info.model_uri)
    top = served.predict(pd.DataFrame({"user_id": [0, 1]}), params={"n": 5})
    expected = model.recommend([0, 1], n=5)
    assert top.item_id.tolist() == expected.item_id.tolist()
