"""The recommender's one model interface: every trainer produces a FactorModel, and its top-N,
pair scores, similar items and files behave the same whoever trained it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from flyray.recsys import FactorModel, FunkSVDParams, Ratings, baselines, trainers
from flyray.recsys.ials import IALSParams


def _ratings(n_users=300, n_items=120, n=6_000, seed=0) -> Ratings:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"u": rng.integers(0, n_users, n), "i": rng.zipf(1.3, n) % n_items})
    frame = frame.drop_duplicates()
    return Ratings(frame.u, frame.i, np.ones(len(frame)))


@pytest.fixture(scope="module")
def models() -> dict[str, FactorModel]:
    train = _ratings()
    n_users, n_items = 300, 120
    small = FunkSVDParams(n_factors=8, n_epochs=3, negatives=2, rating_min=0.0)
    return {
        "funksvd": trainers.fit_local("funksvd", train, n_users, n_items, small),
        "ials": trainers.fit_local("ials", train, n_users, n_items, IALSParams(8, 3)),
        "popularity": baselines.popularity(train, n_users, n_items),
        "biases": baselines.biases(train, n_users, n_items, small),
    }


def _brute_top_n(model: FactorModel, rows: np.ndarray, n: int) -> np.ndarray:
    scores = model.P[rows] @ model.Q.T + model.global_mean + model.bu[rows, None]
    scores = scores + (model.bi if model.rank_item_bias else 0)
    for k, row in enumerate(rows):
        scores[k, model.seen_items[model.seen_indptr[row] : model.seen_indptr[row + 1]]] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :n]


@pytest.mark.parametrize("name", ["funksvd", "ials", "popularity", "biases"])
def test_every_trainer_ranks_through_the_same_interface(models, name):
    model = models[name]
    assert isinstance(model, FactorModel) and model.name == name
    rows = np.arange(len(model.user_ids))
    items, scores = model.top_n_indexed(rows, 10)
    want = _brute_top_n(model, rows, 10)
    # Ties (popularity counts, biases) may order differently; the scores ranked may not.
    brute = np.take_along_axis(
        model.P @ model.Q.T + model.global_mean + model.bu[:, None]
        + (model.bi if model.rank_item_bias else 0), want, 1,
    )  # fmt: skip
    np.testing.assert_allclose(scores, brute, rtol=1e-5, atol=1e-5)
    assert (items == want).mean() > 0.97
    for row in rows[:50]:  # never a training item
        seen = model.seen_items[model.seen_indptr[row] : model.seen_indptr[row + 1]]
        assert not set(items[row]) & set(seen)
    frame = model.recommend(model.user_ids[:3], n=4)
    assert list(frame.columns) == ["user_id", "rank", "item_id", "score"]
    assert frame["rank"].tolist() == [1, 2, 3, 4] * 3


def test_pair_scores_and_unknown_ids(models):
    model = models["funksvd"]
    got = model.score([0, 0, -7], [5, 999, 5])
    mu = model.global_mean
    p = model.trainer["params"]
    want0 = mu + model.bu[0] + model.bi[5] + model.P[0] @ model.Q[5]
    assert got[0] == pytest.approx(np.clip(want0, p["rating_min"], p["rating_max"]), rel=1e-5)
    assert got[1] == pytest.approx(np.clip(mu + model.bu[0], 0, 5), rel=1e-5)  # unknown item
    assert got[2] == pytest.approx(np.clip(mu + model.bi[5], 0, 5), rel=1e-5)  # unknown user
    with pytest.raises(ValueError, match="same length"):
        model.score([1, 2], [3])


def test_similar_items_are_nearest_by_cosine_never_the_item_itself(models):
    model = models["ials"]
    items = model.item_ids[[0, 7, 30]]
    got = model.similar_items(items, n=5)
    unit = model.Q / np.linalg.norm(model.Q, axis=1, keepdims=True)
    for item, group in got.groupby("item_id", sort=False):
        cos = unit @ unit[item]
        cos[item] = -np.inf
        want = np.argsort(-cos, kind="stable")[:5]
        assert group.similar_item_id.tolist() == want.tolist()
        np.testing.assert_allclose(group.similarity, cos[want], rtol=1e-5)
    with pytest.raises(KeyError, match="unknown item ids"):
        model.similar_items([10_000])


def test_files_round_trip_and_older_funksvd_files_still_load(models, tmp_path):
    model = models["ials"]
    model.save(str(tmp_path / "m"))
    loaded = FactorModel.load(str(tmp_path / "m"))
    assert loaded.trainer == model.trainer and (loaded.score_min, loaded.score_max) == (0, 1)
    pd.testing.assert_frame_equal(loaded.recommend([1, 2, 3]), model.recommend([1, 2, 3]))
    # A champion registered by flyray 0.x: FunkSVD files with the params in meta.json.
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    legacy = {"format": "flyray.funksvd", "version": 1, "global_mean": 0.7,
              "params": {"rating_min": 0.0, "rating_max": 1.0, "biased": False,
                         "rank_item_bias": True},
              "history": meta["history"], "trainer": {"model": "ials", "alpha": 1.0}}  # fmt: skip
    (tmp_path / "m" / "meta.json").write_text(json.dumps(legacy))
    old = FactorModel.load(str(tmp_path / "m"))
    assert old.global_mean == 0.0 and old.trainer == {"name": "ials", "params": {"alpha": 1.0}}
    pd.testing.assert_frame_equal(old.recommend([1, 2, 3]), model.recommend([1, 2, 3]))


def test_a_model_aligned_to_other_ids_scores_them_as_its_own(models):
    model = models["funksvd"]
    users, items = np.array([5, 999, 2]), np.array([3, 1, 12345])
    aligned = model.aligned(users, items)
    u, i = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
    raw_u, raw_i = users[u.ravel()], items[i.ravel()]
    np.testing.assert_allclose(aligned.score_indexed(u.ravel(), i.ravel()),
                               model.score(raw_u, raw_i), rtol=1e-6)  # fmt: skip


def test_an_unknown_trainer_is_named():
    with pytest.raises(ValueError, match="model must be one of"):
        trainers.check("svd++")
