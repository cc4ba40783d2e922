"""The nightly plan backfilled over three past days (workflows/backfill.py), as local runs: one
version a day, each with its own data window and data digest in its lineage; the last day's
version trained again by `make reproduce` with the same numbers."""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import date

import mlflow
import pytest

from flyray.lineage import DataInput
from tests.test_reproduce import reproduced
from workflows import backfill


def test_kickoffs_are_the_schedules_and_include_both_ends():
    days = backfill.kickoffs(date(2026, 2, 27), date(2026, 3, 1))
    assert [d.isoformat() for d in days] == [
        "2026-02-27T03:00:00+00:00", "2026-02-28T03:00:00+00:00", "2026-03-01T03:00:00+00:00",
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        backfill._parse(["--from", "2026-03-02", "--to", "2026-03-01"])


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_cluster")
def test_a_three_day_backfill_registers_a_version_per_day_and_each_reproduces(
    tmp_path, flyte_cache, pinned_commit, capsys, data_dir
):
    inputs = {"tuning": {"trials": 0}, "ranking_users": 500,
              "params": {"n_factors": 8, "n_epochs": 4}}  # fmt: skip
    code = backfill.main(["--from", "2026-11-01", "--to", "2026-11-03", "--demo-events", "20000",
                          "--inputs", json.dumps(inputs)])  # fmt: skip
    printed = capsys.readouterr().out
    print(printed)
    assert code == 0
    client = mlflow.MlflowClient(f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}")
    versions = sorted(client.search_model_versions("name='flyray-funksvd'"),
                      key=lambda v: int(v.version))  # fmt: skip
    assert [str(v.version) for v in versions] == ["1", "2", "3"]
    windows = [v.tags["lineage.window.clickstream"] for v in versions]
    # the plan's 30-day window ending at each day's kickoff
    assert windows[0] == "[2026-10-02T03:00:00+00:00, 2026-11-01T03:00:00+00:00)"
    assert windows[2].endswith("2026-11-03T03:00:00+00:00)") and len(set(windows)) == 3
    assert len({v.tags["lineage.data.clickstream"] for v in versions}) == 3  # a window each
    # once a day's version is the champion, later days are measured against it
    promoted = [i for i, v in enumerate(versions) if v.tags.get("promotion") == "champion"]
    for v in versions[promoted[0] + 1 :] if promoted else []:
        assert v.tags["drift.against"] and float(v.tags["drift.max_psi"]) >= 0
    for day in ("2026-11-01", "2026-11-02", "2026-11-03"):
        assert f"\n{day}" in printed

    # `make reproduce` of the last day: its recipe names the day, the window's demo events are
    # generated again (the recorded file is gone) with the same digest, the numbers are the same
    source = DataInput.read_tag(versions[2].tags["lineage.data.clickstream"])[0]
    shutil.rmtree(os.path.dirname(source))
    again = reproduced("flyray-funksvd", "3", capsys)
    assert "clickstream: demo data, generated again from the recipe's seed" in again
    [digests] = [line for line in again.splitlines() if "data clickstream: sha256" in line]
    recorded, reproduced_digest = re.findall(r"sha256 (\w+) recorded, (\w+) reproduced", digests)[0]
    assert recorded == reproduced_digest
    [ndcg] = [line.split() for line in again.splitlines() if line.startswith("ndcg_at_10 ")]
    assert ndcg[-2:] == ["identical", "yes"]
    recorded_window = versions[2].tags["lineage.window.clickstream"]
    assert (
        client.get_model_version("flyray-funksvd-reproduced", "1").tags[
            "lineage.window.clickstream"
        ]
        == recorded_window
    )
