"""Feature engineering: weights, dedup, filters, dense ids and a split with no leakage."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import event, jsonl

from flyray.clickstream.config import FeatureConfig
from flyray.clickstream.features import FeatureError, build_features
from flyray.clickstream.generate import GeneratorConfig, generate
from flyray.clickstream.ingest import ingest

NO_FILTERS = FeatureConfig(
    min_item_interactions=1, min_user_interactions=1, validation_fraction=0, test_fraction=0
)

# Every test here but one or two runs on Ray: the session's local Ray for the module.
pytestmark = pytest.mark.usefixtures("ray_cluster")


def _prepare(tmp_path, lines, config):
    src = tmp_path / "c.jsonl"
    src.write_bytes(jsonl(*lines))
    report = ingest(str(src), str(tmp_path / "ingest"))
    profile = build_features(report.events_uri, str(tmp_path / "feat"), config, report)
    splits = {
        s: pq.read_table(tmp_path / "feat" / s).to_pandas() for s in ("train", "validation", "test")
    }
    return profile, splits


def _ts(minute: int) -> str:
    return f"2024-01-01T00:{minute:02d}:00Z"


def test_weights_saturate_onto_the_rating_scale(tmp_path):
    lines = [
        event(1, 10, "view", _ts(0)),
        event(1, 10, "cart", _ts(1)),
        event(1, 10, "purchase", _ts(2)),
        event(1, 11, "view", _ts(3)),
        event(1, 11, "cart", _ts(4)),
        event(1, 11, "remove_from_cart", _ts(5)),
        event(1, 12, "view", _ts(6)),
        event(1, 12, "view", _ts(6)),  # exact duplicate
        event(1, 13, "cart", _ts(7)),
        event(1, 13, "remove_from_cart", _ts(8)),  # nets to 1
        event(2, 10, "view", _ts(9)),
        event(2, 10, "remove_from_cart", _ts(10)),  # nets to -2
    ]
    profile, splits = _prepare(tmp_path, lines, NO_FILTERS)
    train = splits["train"].set_index("item_id")
    expected = {10: 15.0, 11: 2.0, 12: 1.0, 13: 1.0}
    for item, weight in expected.items():
        assert train.loc[item, "weight"] == pytest.approx(weight)
        assert train.loc[item, "rating"] == pytest.approx(
            1 + 4 * (1 - math.exp(-weight / 5)), rel=1e-5
        )
    assert profile.duplicates_removed == 1
    assert profile.non_positive_pairs == 1
    assert profile.users == 1 and set(train.index) == set(expected)
    assert train["rating"].min() >= 1.0 and train["rating"].max() <= 5.0


def test_filters_and_dense_id_maps(tmp_path):
    lines = []
    for user in range(1, 6):  # users 1..5 each see items 100..103
        lines += [event(user, item, ts=_ts(item - 100 + user)) for item in range(100, 104)]
    lines += [event(1, 999, ts=_ts(30))]  # an item only one user saw
    lines += [event(42, 100, ts=_ts(31)), event(42, 101, ts=_ts(32))]  # a user with two items
    cfg = FeatureConfig(
        min_item_interactions=2, min_user_interactions=3, validation_fraction=0, test_fraction=0.25
    )
    profile, splits = _prepare(tmp_path, lines, cfg)
    allr = np.concatenate([s["item_id"].to_numpy() for s in splits.values()])
    assert 999 not in allr
    users = pq.read_table(tmp_path / "feat" / "id_maps" / "users.parquet").to_pandas()
    items = pq.read_table(tmp_path / "feat" / "id_maps" / "items.parquet").to_pandas()
    assert sorted(users["user_id"]) == [1, 2, 3, 4, 5]  # user 42 has only 2 items
    assert users["user_idx"].tolist() == list(range(5))
    assert items["item_id"].tolist() == [100, 101, 102, 103]
    for split in splits.values():
        umap = dict(zip(users["user_idx"], users["user_id"], strict=True))
        imap = dict(zip(items["item_idx"], items["item_id"], strict=True))
        assert [umap[u] for u in split["user_idx"]] == split["user_id"].tolist()
        assert [imap[i] for i in split["item_idx"]] == split["item_id"].tolist()
    assert profile.ratings_by_split == {"train": 15, "validation": 0, "test": 5}
    assert profile.items_seen == 5 and profile.users_seen == 6


def test_split_has_no_leakage_on_generated_data(tmp_path):
    src = tmp_path / "demo.jsonl"
    generate(src, GeneratorConfig(n_events=60_000, seed=3))
    report = ingest(str(src), str(tmp_path / "ingest"))
    profile = build_features(report.events_uri, str(tmp_path / "feat"), FeatureConfig(), report)
    frames = {
        s: pq.read_table(tmp_path / "feat" / s).to_pandas() for s in ("train", "validation", "test")
    }
    train, val, test = frames["train"], frames["validation"], frames["test"]
    assert len(val) > 0 and len(test) > 0
    last_train = train.groupby("user_id")["last_ts"].max()
    first_val = val.groupby("user_id")["first_ts"].min()
    last_val = val.groupby("user_id")["last_ts"].max()
    first_test = test.groupby("user_id")["first_ts"].min()
    held_first = np.minimum(
        first_val.reindex(first_test.index.union(first_val.index)),
        first_test.reindex(first_test.index.union(first_val.index)),
    )
    both = last_train.index.intersection(held_first.index)
    assert (last_train[both] < held_first[both]).all()  # strictly later, per user
    vt = last_val.index.intersection(first_test.index)
    assert (last_val[vt] < first_test[vt]).all()
    # Each (user, item) is in exactly one split, and held-out users were trained on.
    pairs = [set(zip(f["user_id"], f["item_id"], strict=True)) for f in frames.values()]
    assert not (pairs[0] & pairs[1]) and not (pairs[0] & pairs[2]) and not (pairs[1] & pairs[2])
    assert set(test["user_id"]) <= set(train["user_id"])
    share = len(test) / (len(train) + len(val) + len(test))
    assert 0.08 < share < 0.2
    assert profile.truncated_events > 0
    assert profile.events == 60_000 and profile.rejects == 0


def test_truncation_drops_training_events_after_the_cut(tmp_path):
    lines = [
        event(1, 10, "view", _ts(0)),
        event(1, 11, "view", _ts(1)),
        event(1, 12, "view", _ts(2)),
        event(1, 10, "purchase", _ts(9)),  # after item 12 (held out) was first seen
    ]
    cfg = FeatureConfig(
        min_item_interactions=1, min_user_interactions=1, validation_fraction=0, test_fraction=0.2
    )
    profile, splits = _prepare(tmp_path, lines, cfg)
    assert splits["test"]["item_id"].tolist() == [12]
    train = splits["train"].set_index("item_id")
    assert train.loc[10, "weight"] == 1.0 and train.loc[10, "n_events"] == 1
    assert profile.truncated_events == 1


def test_everything_filtered_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureError, match="no ratings left after filtering"):
        _prepare(tmp_path, [event(1, 10), event(2, 11)], FeatureConfig(min_item_interactions=5))


def test_bad_feature_config_is_refused():
    with pytest.raises(ValueError, match="unknown event types"):
        FeatureConfig(event_weights={"wishlist": 2.0})
    with pytest.raises(ValueError, match="leave data to train on"):
        FeatureConfig(validation_fraction=0.5, test_fraction=0.5)


def test_data_window_keeps_only_events_inside_it(tmp_path):
    lines = [
        event(u, i, ts=f"2024-01-{d:02d}T12:00:00Z")
        for d in (1, 5, 9)
        for u in range(1, 5)
        for i in range(10, 14)
    ]
    cfg = FeatureConfig(
        min_item_interactions=1,
        min_user_interactions=1,
        test_fraction=0.0,
        validation_fraction=0.0,
        window_end="2024-01-09T00:00:00",
        window_days=5,
    )
    profile, splits = _prepare(tmp_path, lines, cfg)
    assert profile.events == 16  # only 2024-01-05 is in [01-04, 01-09)
    assert set(splits["train"]["first_ts"].dt.day) == {5}
    with pytest.raises(FeatureError, match="no events between"):
        (tmp_path / "b").mkdir()
        _prepare(tmp_path / "b", lines, FeatureConfig(window_end="2023-01-01", window_days=3))
    with pytest.raises(ValueError, match="Invalid isoformat"):
        FeatureConfig(window_end="yesterday", window_days=1)
