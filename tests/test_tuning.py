"""Ray Tune search of the recommender: configuration, the off switch, a real search on Ray
that reports validation NDCG per epoch and returns the winner, never worse than the given
parameters; the one-standard-error rule; the report's deck and plot; its Flyte round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_ials import taste_clicks

from flyray.recsys import FunkSVDParams
from flyray.recsys.evaluate import ndcg_with_error
from flyray.recsys.ials import IALSParams, fit_local
from flyray.recsys.model import Ratings
from flyray.recsys.tuning import (
    TuningConfig,
    TuningReport,
    _GivenRunsOut,
    _winner,
    tune_recommender,
)

# Deliberately poor given parameters: too slow a learning rate to learn in a few epochs.
GIVEN = FunkSVDParams(n_factors=8, n_epochs=6, lr=1e-4, reg=0.05, negatives=1, rating_min=0.0)
GIVEN_IALS = IALSParams(n_factors=8, n_epochs=4)


def splits():
    data = taste_clicks(n_users=300, n_items=120, per_user=12, seed=4)
    held = np.random.default_rng(0).random(len(data)) < 0.25
    part = lambda m: Ratings(data.users[m], data.items[m], data.values[m])  # noqa: E731
    return part(~held), part(held)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"metric": "rmse"}, "ndcg@k"),
        ({"models": "funksvd,bpr"}, "unknown"),
        ({"trials": -1}, "trials"),
        ({"time_budget_s": 0}, "time_budget_s"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TuningConfig(**kwargs)


def test_space_override_lists_the_values_to_try_and_names_unknown_ones():
    space = TuningConfig(space='{"funksvd": {"n_factors": [8, 16]}}').search_space("funksvd")
    assert space["funksvd"]["n_factors"].categories == [8, 16]
    assert "ials" not in space and space["model"].categories == ["funksvd"]
    both = TuningConfig(models="funksvd,ials").search_space("funksvd")
    assert both["model"].categories == ["funksvd", "ials"]
    with pytest.raises(ValueError, match="no parameter 'depth'"):
        TuningConfig(space='{"ials": {"depth": [1]}}').search_space("ials")


def test_zero_trials_keeps_the_given_parameters_without_searching():
    train, val = splits()
    result = tune_recommender(train, val, 300, 120, "ials", GIVEN, GIVEN_IALS,
                              TuningConfig(trials=0))  # fmt: skip
    assert (result.model, result.funksvd, result.ials) == ("ials", GIVEN, GIVEN_IALS)
    assert result.report.table == [] and "off" in result.report.deck()[0]


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_cluster")
def test_search_on_ray_reports_every_epoch_and_returns_the_winner(tmp_path):
    train, val = splits()
    config = TuningConfig(trials=5, time_budget_s=120, models="funksvd,ials", grace_epochs=2,
                          validation_users=0)  # fmt: skip
    result = tune_recommender(train, val, 300, 120, "funksvd", GIVEN, GIVEN_IALS, config)
    report = result.report
    assert report.trials == len(report.table) == len(report.curves) <= 5
    assert report.trials >= 3
    # The given parameters are tried first; too poor to learn, they are beaten by more than the
    # standard error of their score, so the best trial wins.
    first = report.table[0]
    assert first["model"] == "funksvd" and first["lr"] == GIVEN.lr and first["given"]
    assert first["epochs run"] == GIVEN.n_epochs  # ASHA never stops them: the yardstick
    assert not any(row["given"] for row in report.table[1:])
    assert report.best_score == max(row["score"] for row in report.table)
    assert report.best_score - first["score"] > first["se"] > 0
    assert "above the given parameters" in report.decision
    for row in report.table:  # one validation score per epoch, ASHA may stop early
        curve = report.curves[row["trial"]]
        assert row["epochs run"] == len(curve) and 1 <= len(curve) <= 6
        assert row["score"] == max(curve) and all(0 <= v <= 1 for v in curve)
    winner = result.ials if result.model == "ials" else result.funksvd
    for name, value in report.best_params.items():
        assert getattr(winner, name) == value
    assert report.best_model == result.model
    best_row = max(report.table, key=lambda row: row["score"])
    given = GIVEN_IALS if result.model == "ials" else GIVEN
    # early stopping only when it saw every epoch and the peak beats the last by more than luck
    full = best_row["epochs run"] == given.n_epochs
    peaked = best_row["score"] - report.curves[best_row["trial"]][-1] > best_row["se"]
    assert winner.n_epochs == (best_row["best epoch"] if full and peaked else given.n_epochs)
    # deck: a summary, the per-trial validation plot and the trials table; a PNG for MLflow
    deck = report.deck()
    assert len(deck) == 3 and "<img" in deck[1] and best_row["trial"] in deck[2]
    png = report.plot(str(tmp_path / "curves.png"))
    assert Path(png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_cluster")
def test_a_budget_spent_before_any_trial_reports_trains_the_given_parameters_and_says_so():
    train, val = splits()
    config = TuningConfig(trials=3, time_budget_s=0.01, validation_users=0)
    result = tune_recommender(train, val, 300, 120, "funksvd", GIVEN, GIVEN_IALS, config)
    assert (result.model, result.funksvd, result.ials) == ("funksvd", GIVEN, GIVEN_IALS)
    assert result.report.table == [] and "0.01 s budget" in result.report.decision
    assert "given parameters are trained" in result.report.deck()[0]


def _trial(name: str, score: float, se: float, given: bool = False) -> dict:
    return {"trial": name, "model": "ials", "reg": 1.0, "score": score, "se": se,
            "best epoch": 4, "epochs run": 4, "given": given}  # fmt: skip


def test_a_trial_within_one_standard_error_of_the_given_parameters_does_not_replace_them():
    report = TuningReport("ndcg@10", trials=3)
    report.table = [_trial("0:ials", 0.100, 0.010, given=True), _trial("1:ials", 0.108, 0.01),
                    _trial("2:ials", 0.090, 0.01)]  # fmt: skip
    assert _winner(report)["trial"] == "0:ials"
    assert "within one standard error (0.0100)" in report.decision
    report.table[1]["score"] = 0.111  # now beyond the given score's error: it wins
    assert _winner(report)["trial"] == "1:ials"
    assert "0.0110 above the given parameters" in report.decision
    report.table = report.table[1:]  # no given trial (e.g. cut by the budget): the best wins
    assert _winner(report)["trial"] == "1:ials" and report.decision == "best of 3 trials"


def test_the_reported_standard_error_is_the_spread_of_per_user_ndcg():
    train, val = splits()
    model = fit_local(train, 300, 120, IALSParams(n_factors=8, n_epochs=3))
    mean, error = ndcg_with_error(model, val, 10, max_users=0)
    per_user = []
    for user in np.unique(val.users):
        mine = val.users == user
        one = Ratings(val.users[mine], val.items[mine], val.values[mine])
        per_user.append(ndcg_with_error(model, one, 10, max_users=0)[0])
    assert 0 < mean == pytest.approx(np.mean(per_user))
    assert error == pytest.approx(np.std(per_user, ddof=1) / np.sqrt(len(per_user)))
    assert 0.005 < error < 0.05  # 300 users: the luck two configurations must differ by


def test_asha_never_stops_the_given_parameters_but_stops_others_that_trail():
    from ray.tune.experiment import Trial

    given = {"model": "ials", "ials": {"reg": 1.0}}
    scheduler = _GivenRunsOut([given], metric="score", mode="max", max_t=16, grace_period=1,
                              reduction_factor=2)  # fmt: skip
    leaders = [Trial("t", config={"model": "ials", "ials": {"reg": r}}, stub=True) for r in (5, 3)]
    trailing = [Trial("t", config=dict(given), stub=True),
                Trial("t", config={"model": "ials", "ials": {"reg": 0.1}}, stub=True)]  # fmt: skip
    for trial in leaders + trailing:
        scheduler.on_trial_add(None, trial)
    for trial in leaders:
        for epoch in (1, 2):
            scheduler.on_trial_result(None, trial, {"training_iteration": epoch, "score": 0.5})
    actions = {
        trial.config["ials"]["reg"]: [
            scheduler.on_trial_result(None, trial, {"training_iteration": e, "score": 0.1})
            for e in (1, 2)
        ]
        for trial in trailing
    }
    assert actions == {1.0: ["CONTINUE", "CONTINUE"], 0.1: ["STOP", "STOP"]}


def test_report_round_trips_through_flyte_types():
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine

    report = TuningReport("ndcg@10", 1, 2.0, "funksvd", 0.2, {"n_factors": 64,
                          "rank_item_bias": False}, [{"trial": "0:funksvd", "score": 0.2}],
                          {"0:funksvd": [0.1, 0.2]})  # fmt: skip
    ctx = FlyteContextManager.current_context()
    literal = TypeEngine.to_literal(ctx, report, TuningReport,
                                    TypeEngine.to_literal_type(TuningReport))  # fmt: skip
    assert TypeEngine.to_python_value(ctx, literal, TuningReport) == report
