"""Implicit-feedback negatives: redrawn every epoch, deterministic for a seed, drawn by
popularity ** beta, never a rated item; DSGD's split over item blocks; ranking without b_i."""

from __future__ import annotations

import numpy as np
import pytest

from flyray.raytrain import DistributedConfig
from flyray.recsys import FunkSVD, FunkSVDParams
from flyray.recsys.distributed import split_negatives, train
from flyray.recsys.funksvd import TrainingSet, negative_weights
from flyray.recsys.model import Ratings


def clicks(n_users=300, n_items=120, per_user=8, seed=0):
    """Each user clicks items drawn with a steep popularity skew."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_items + 1) ** 1.1
    u = np.repeat(np.arange(n_users), per_user)
    i = rng.choice(n_items, len(u), p=pop / pop.sum())
    pairs = np.unique(u * n_items + i)
    return (pairs // n_items).astype(np.int32), (pairs % n_items).astype(np.int32)


def training_set(params, u, i, n_users=300, n_items=120):
    r = np.ones(len(u), np.float32)
    weights = negative_weights(i, n_items, params.negative_beta)
    return TrainingSet(u, i, r, n_users, weights, params)


def test_negatives_are_redrawn_every_epoch_and_repeat_for_a_seed():
    u, i = clicks()
    params = FunkSVDParams(negatives=3, rating_min=0.0, seed=5)
    a, b = training_set(params, u, i), training_set(params, u, i)
    n = len(u)
    first = a.at(1).items[n:].copy()
    second = a.at(2).items[n:].copy()
    assert len(first) == 3 * n and (first != second).mean() > 0.5
    np.testing.assert_array_equal(b.at(2).items[n:], second)  # same seed, same draw
    np.testing.assert_array_equal(a.at(1).items[n:], first)  # an epoch is reproducible
    other = training_set(FunkSVDParams(negatives=3, rating_min=0.0, seed=6), u, i)
    assert (other.at(1).items[n:] != first).mean() > 0.5
    fixed = training_set(FunkSVDParams(negatives=3, rating_min=0.0, resample_negatives=False),
                         u, i)  # fmt: skip
    np.testing.assert_array_equal(fixed.at(1).items[n:], fixed.at(7).items[n:])


def test_negatives_are_never_rated_items_and_carry_the_negative_rating():
    u, i = clicks()
    params = FunkSVDParams(negatives=4, rating_min=0.0, negative_rating=0.0, negative_beta=0.7)
    data = training_set(params, u, i).at(3)
    n = len(u)
    rated = set((u.astype(np.int64) * 120 + i).tolist())
    drawn = data.users[n:].astype(np.int64) * 120 + data.items[n:]
    assert not rated.intersection(drawn.tolist())
    np.testing.assert_array_equal(data.users[n:], np.repeat(u, 4))
    assert (data.ratings[n:] == 0.0).all() and (data.ratings[:n] == 1.0).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_sampled_frequencies_follow_popularity_to_the_beta(beta):
    n_items = 50
    rng = np.random.default_rng(1)
    popularity = rng.integers(1, 200, n_items)
    items = np.repeat(np.arange(n_items), popularity).astype(np.int32)
    users = np.full(len(items), 0, np.int32)  # ids only feed the weights; one user sees none
    weights = negative_weights(items, n_items, beta)
    expected = popularity**beta / (popularity**beta).sum()
    params = FunkSVDParams(negatives=1, rating_min=0.0, negative_beta=beta)
    data = TrainingSet(users[:0], items[:0], np.zeros(0, np.float32), 1, weights, params,
                       neg_users=np.zeros(200_000, np.int32))  # fmt: skip
    freq = np.bincount(data.at(1).items, minlength=n_items) / 200_000
    # Within 5 standard errors of a multinomial draw, item by item.
    assert np.all(np.abs(freq - expected) < 5 * np.sqrt(expected * (1 - expected) / 200_000))


def test_never_rated_items_are_drawn_only_when_uniform():
    items = np.array([0, 0, 1, 2], np.int32)  # items 3 and 4 never rated
    assert negative_weights(items, 5, 1.0)[3:].sum() == 0
    assert (negative_weights(items, 5, 0.0) == 1).all()


def test_dsgd_split_follows_block_mass_and_keeps_every_negative():
    per_user = np.array([3, 7, 0, 12, 1])
    mass = np.array([1.0, 3.0])
    counts = split_negatives(per_user, mass)
    np.testing.assert_array_equal(counts.sum(axis=1), per_user)
    np.testing.assert_array_equal(counts[3], [3, 9])
    assert (np.abs(counts - per_user[:, None] * mass / mass.sum()) < 1).all()


@pytest.mark.usefixtures("ray_cluster")
def test_dsgd_trains_on_the_same_number_of_negatives_as_one_process():
    u, i = clicks()
    params = FunkSVDParams(n_factors=8, n_epochs=2, lr=0.01, negatives=3, rating_min=0.0,
                           negative_beta=0.5)  # fmt: skip
    ratings = Ratings(u, i, np.ones(len(u), np.float32))
    model = train(ratings, 300, 120, params)
    assert sum(w["ratings"] for w in model.history[-1].workers) == 4 * len(u)
    assert model.global_mean == pytest.approx(0.25)


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_cluster")
def test_resumed_dsgd_draws_the_negatives_an_uninterrupted_run_draws(tmp_path):
    u, i = clicks()
    ratings = Ratings(u, i, np.ones(len(u), np.float32))
    params = FunkSVDParams(n_factors=8, n_epochs=4, lr=0.01, negatives=2, rating_min=0.0,
                           negative_beta=0.6)  # fmt: skip
    uri = str(tmp_path / "ckpt")
    train(ratings, 300, 120, FunkSVDParams(**{**params.__dict__, "n_epochs": 2}),
          DistributedConfig(workers=2, checkpoint_uri=uri))  # fmt: skip
    resumed = train(ratings, 300, 120, params, DistributedConfig(workers=2, checkpoint_uri=uri))
    whole = train(ratings, 300, 120, params, DistributedConfig(workers=2))
    np.testing.assert_array_equal(resumed.P, whole.P)
    np.testing.assert_array_equal(resumed.Q, whole.Q)


def test_ranking_without_item_bias_leaves_popularity_out():
    u, i = clicks()
    r = np.ones(len(u), np.float32)
    params = FunkSVDParams(n_factors=8, n_epochs=5, negatives=2, rating_min=0.0, lr=0.01)
    model = FunkSVD(params).fit_indexed(u, i, r, np.arange(300), np.arange(120))
    model.bi[:] = 0
    model.bi[119] = 100.0  # the least popular item, made most "popular" by its bias
    assert (model.top_n_indexed(np.arange(300), 1)[0] == 119).mean() > 0.9
    model.rank_item_bias = False
    expected = np.argsort(-(model.P @ model.Q.T), axis=1)
    got = model.top_n_indexed(np.arange(5), 3, filter_seen=False)[0]
    np.testing.assert_array_equal(got, expected[:5, :3])


def test_popularity_weighted_negatives_rank_held_out_clicks_better_than_none():
    """The objective's point: negatives beat plain positive-only FunkSVD on ranking."""
    u, i = clicks(n_users=400, per_user=12, seed=3)
    rng = np.random.default_rng(0)
    held = rng.random(len(u)) < 0.2
    hits = {}
    for name, negatives in (("none", 0), ("three", 3)):
        params = FunkSVDParams(n_factors=8, n_epochs=15, lr=0.02, negatives=negatives,
                               rating_min=0.0, negative_beta=0.5)  # fmt: skip
        model = FunkSVD(params).fit_indexed(
            u[~held], i[~held], np.ones((~held).sum(), np.float32), np.arange(400), np.arange(120)
        )
        top = model.top_n_indexed(np.arange(400), 10)[0]
        test = set((u[held].astype(np.int64) * 120 + i[held]).tolist())
        shown = np.repeat(np.arange(400), 10) * 120 + top.ravel()
        hits[name] = len(test.intersection(shown.tolist()))
    assert hits["three"] > 1.5 * hits["none"]
