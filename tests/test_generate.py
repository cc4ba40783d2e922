"""The demo generator: exact size, deterministic, funnel rates, ground truth, every layout."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from flyray.clickstream.generate import GeneratorConfig, generate
from flyray.clickstream.layouts import PRESETS, detect, first_line
from flyray.clickstream.parse import parse_block
from flyray.clickstream.schema import EVENT_TYPES


def test_deterministic_exact_size_with_ground_truth(tmp_path):
    cfg = GeneratorConfig(n_events=30_000, seed=7)
    a = generate(tmp_path / "a.jsonl", cfg)
    b = generate(tmp_path / "b.jsonl", cfg)
    digest = [
        hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.jsonl", "b.jsonl")
    ]
    assert digest[0] == digest[1]
    assert a["events"] == b["events"] == 30_000
    assert (tmp_path / "a.jsonl").read_bytes().count(b"\n") == 30_000
    truth = np.load(a["truth"])
    assert truth["user_factors"].shape == (a["users"], 8)
    assert truth["item_factors"].shape == (a["items"], 8)
    assert abs(truth["item_popularity"].sum() - 1) < 1e-9
    assert json.loads((tmp_path / "a.truth.json").read_text())["events"] == 30_000
    other = generate(tmp_path / "c.jsonl", GeneratorConfig(n_events=30_000, seed=8))
    assert other["events_by_type"] != a["events_by_type"]


def test_funnel_rates_popularity_and_time_order(tmp_path):
    summary = generate(tmp_path / "d.jsonl", GeneratorConfig(n_events=200_000, seed=1))
    by_type = summary["events_by_type"]
    views = by_type["view"]
    assert 0.04 < by_type["cart"] / views < 0.08  # REES46-like: ~6% of views carted
    assert 0.25 < by_type["purchase"] / by_type["cart"] < 0.45
    assert 0 < by_type["remove_from_cart"] < by_type["cart"]
    events = parse_block((tmp_path / "d.jsonl").read_bytes(), "jsonl").events
    counts = np.sort(np.bincount(events["item_id"].to_numpy()))[::-1]
    top_share = counts[: len(counts) // 100].sum() / counts.sum()
    assert top_share > 0.15  # power law: the top 1% of items draw a large share
    ts = events["ts"].cast("int64").to_numpy()
    assert (np.diff(ts) >= 0).mean() > 0.95  # chunks are written in time order


def test_csv_layout_matches_rees46(tmp_path):
    generate(tmp_path / "e.csv", GeneratorConfig(n_events=5_000, seed=2))
    data = (tmp_path / "e.csv").read_bytes()
    header = data.split(b"\n", 1)[0].decode()
    assert (
        header
        == "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
    )
    result = parse_block(data, "rees46")
    assert result.n_rejects == 0 and result.events.num_rows == 5_000
    assert b",," in data  # blanks in category_code and brand, like the real export


@pytest.mark.parametrize("layout", list(PRESETS))
def test_writes_every_layout_exactly_and_auto_reads_it_back(tmp_path, layout):
    path = tmp_path / f"g-{layout}.{'jsonl' if layout == 'jsonl' else 'csv'}"
    summary = generate(path, GeneratorConfig(n_events=4_000, seed=5, layout=layout))
    data = path.read_bytes()
    detected, _ = detect(first_line(data), str(path))
    assert detected.name == layout
    result = parse_block(data, layout)
    assert result.n_rejects == 0 and result.events.num_rows == summary["events"] == 4_000
    codes = np.bincount(result.events["event_code"].to_numpy(), minlength=4)
    assert dict(zip(EVENT_TYPES, codes.tolist(), strict=True)) == summary["events_by_type"]
    ts = result.events["ts"].cast("int64").to_numpy()
    assert (np.diff(ts) >= 0).mean() > 0.95  # the same time-ordered stream in every layout
    if layout in ("diginetica", "yoochoose"):  # views only, as those logs are
        assert summary["events_by_type"]["view"] == 4_000
