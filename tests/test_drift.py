"""Data drift (flyray.drift): windows from the project's clickstream generator, profiled as the
recommender profiles its training data; a window of the same world is not flagged, one whose
popularity moved to other items is; with hold_on_drift the champion stays."""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import numpy as np
import pyarrow.json as pj
import pytest
from test_registry_auth import candidate

from flyray import drift, registry
from flyray.clickstream.generate import GeneratorConfig, generate
from flyray.recsys.model import Ratings
from flyray.recsys.report import drift_columns


def _window(path, first_day: int, last_day: int) -> dict[str, drift.Column]:
    """The recommender's drift columns of the events of days [first_day, last_day)."""
    table = pj.read_json(path).to_pandas()
    day = (table["timestamp"] - table["timestamp"].min().normalize()).dt.days
    events = table[(day >= first_day) & (day < last_day)]
    items, item_idx = np.unique(events["item_id"].to_numpy(), return_inverse=True)
    users, user_idx = np.unique(events["user_id"].to_numpy(), return_inverse=True)
    model = SimpleNamespace(item_ids=items, user_ids=users)
    ratings = Ratings(user_idx, item_idx, np.ones(len(events)))
    profile = SimpleNamespace(events_by_type=events["event_type"].value_counts().to_dict())
    return drift_columns(model, ratings, profile)


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    """Two windows of one world (days 0-14, 14-28) and one of another world, whose popular
    items are others (seed 1)."""
    root = tmp_path_factory.mktemp("drift")
    config = GeneratorConfig(n_events=120_000, days=28)
    generate(root / "world.jsonl", config)
    generate(root / "shifted.jsonl", GeneratorConfig(n_events=120_000, days=28, seed=1))
    return (
        _window(root / "world.jsonl", 0, 14),
        _window(root / "world.jsonl", 14, 28),
        _window(root / "shifted.jsonl", 0, 14),
    )


def test_a_shifted_popularity_is_flagged_and_an_unchanged_window_is_not(windows):
    reference, unchanged, shifted = windows
    champion = drift.profile(reference)
    same = drift.compare(champion, unchanged, "1", 0.2)
    moved = drift.compare(champion, shifted, "1", 0.2)
    print("unchanged:", same.psi, "\nshifted:", moved.psi)
    assert set(same.psi) == {"event_type", "item_popularity", "user_activity"}
    assert not same.drifted and max(same.psi.values()) < 0.1, same.psi
    assert moved.drifted and moved.largest[0] == "item_popularity", moved.psi
    assert moved.psi["item_popularity"] > 10 * same.psi["item_popularity"]
    # the event mix and the activity per user are alike in both worlds
    assert moved.psi["event_type"] < 0.1 and moved.psi["user_activity"] < 0.2
    assert "drifted the threshold 0.2" in moved.summary()


def test_psi_is_zero_for_equal_shares_and_grows_with_the_shift():
    base = {"a": 0.5, "b": 0.5}
    assert drift.psi(base, base) == pytest.approx(0.0, abs=1e-12)
    small, large = drift.psi(base, {"a": 0.55, "b": 0.45}), drift.psi(base, {"a": 0.9, "b": 0.1})
    assert 0 < small < 0.1 < 0.25 < large
    # a numeric column is measured on the reference's bins, so a shift of its values shows
    reference = drift.numeric(np.random.default_rng(0).normal(0, 1, 10_000))
    assert len(reference.edges) == 9
    moved = drift.compare({"x": reference}, {"x": drift.Column(values=np.full(100, 5.0))}, "1", 0.2)
    assert moved.drifted


def test_the_registry_records_drift_and_holds_the_champion_on_it(
    windows, mlflow_server, small_funksvd, monkeypatch
):
    reference, unchanged, shifted = windows
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    config = registry.RegistryConfig("drift-model", "drift-tests", "ndcg@10")

    def register(value, columns, **settings):
        evidence = candidate(small_funksvd, value)
        evidence.columns = columns
        return registry.register(registry.RegistryConfig(**{**config.__dict__, **settings}),
                                 evidence)  # fmt: skip

    first = register(0.30, reference)
    assert first.decision.promoted and first.drift == {}  # no champion to compare with
    second = register(0.40, unchanged)
    assert second.decision.promoted and max(second.drift.values()) < 0.1
    assert "within the threshold" in second.drift_summary
    # better figures, but its data moved: hold_on_drift keeps the champion
    third = register(0.50, shifted, hold_on_drift=True)
    assert not third.decision.promoted
    assert "hold_on_drift keeps the champion" in third.decision.reason
    assert third.drift["item_popularity"] >= 0.2 and "(item_popularity)" in third.drift_summary
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias("drift-model", "champion").version == "2"
    tags = client.get_model_version("drift-model", third.decision.version).tags
    assert (tags["drift.against"], tags["drift.drifted"]) == ("2", "true")
    assert tags["drift.max_psi_of"] == "item_popularity"
    assert "<img" in "".join(third.deck())  # the PSI chart in the registry deck
    # without hold_on_drift the same data only reports it: the metrics decide
    fourth = register(0.50, shifted)
    assert fourth.decision.promoted and fourth.drift["item_popularity"] >= 0.2
