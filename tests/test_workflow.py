"""prepare_data as Flyte runs it locally: typed outputs, a cache keyed on content, kept with its
outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from flytekit import Cache, task, workflow
from flytekit.types.directory import FlyteDirectory

from flyray.clickstream.generate import GeneratorConfig, generate
from tasks.outputs import new_output_dir
from workflows.local import local_run
from workflows.recommendation import prepare_data


@pytest.mark.usefixtures("ray_cluster")
def test_prepare_data_demo_defaults_produce_typed_splits(flyte_cache):
    out = prepare_data(demo_events=20_000)
    train = out.train.open(pd.DataFrame).all()
    test = out.test.open(pd.DataFrame).all()
    assert len(train) == out.profile.ratings_by_split["train"] > 0
    assert len(test) == out.profile.ratings_by_split["test"] > 0
    assert {"user_idx", "item_idx", "rating"} <= set(train.columns)
    assert out.profile.events == 20_000
    assert train["user_idx"].max() < out.profile.users
    assert sorted(p.name for p in Path(out.id_maps.path).iterdir()) == [
        "items.parquet",
        "users.parquet",
    ]


@pytest.mark.usefixtures("ray_cluster")
def test_cache_follows_content_not_path(tmp_path, flyte_cache):
    src = tmp_path / "clickstream.jsonl"
    generate(src, GeneratorConfig(n_events=8_000, seed=1))
    first = prepare_data(source=str(src))
    again = prepare_data(source=str(src))
    assert again.id_maps.path == first.id_maps.path  # cache hit: same outputs, nothing re-run
    generate(src, GeneratorConfig(n_events=9_000, seed=2))  # rewritten in place, same path
    changed = prepare_data(source=str(src))
    assert changed.id_maps.path != first.id_maps.path
    assert changed.profile.events == 9_000


@pytest.mark.usefixtures("ray_cluster")
def test_run_date_selects_the_data_window(flyte_cache):
    from datetime import datetime

    out = prepare_data(demo_events=20_000, run_date=datetime(2025, 6, 1, 3), window_days=10)
    assert out.profile.first_event >= "2025-05-22T03:00:00"
    assert out.profile.last_event < "2025-06-01T03:00:00"
    assert out.profile.events < 20_000  # the demo covers 30 days; the window keeps 10


RUNS: list[int] = []


@task(cache=Cache(version="1"))
def _write(n: int) -> FlyteDirectory:
    RUNS.append(n)
    out = new_output_dir()
    os.makedirs(out)
    Path(out, "n.txt").write_text(str(n))
    return FlyteDirectory(out, remote_directory=False)


@task
def _read(d: FlyteDirectory) -> str:
    return Path(d.download(), "n.txt").read_text()


@workflow
def _written_then_read(n: int) -> str:
    return _read(d=_write(n=n))


def test_a_local_run_keeps_its_outputs_and_cache_together_under_the_data_dir(tmp_path, monkeypatch):
    """flyteorg/flyte#6393: a cache entry outliving the temporary folder of the outputs it names
    failed the next run (`make run` in CI, after another run's tmp_path was removed)."""
    monkeypatch.setenv("FLYRAY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FLYTE_LOCAL_CACHE_ENABLED", "true")
    RUNS.clear()
    with local_run() as root:
        assert _written_then_read(n=3) == "3"
    assert root == tmp_path / "data" / "flyte"
    assert [p.read_text() for p in (root / "raw").rglob("n.txt")] == ["3"]
    with local_run():
        assert _written_then_read(n=3) == "3"  # a cache hit whose outputs are still there
    assert RUNS == [3]
    shutil.rmtree(tmp_path / "data")  # `make clean`: the cache goes with the outputs
    with local_run():
        assert _written_then_read(n=3) == "3"
    assert RUNS == [3, 3]
