"""Ingest on Ray Data: byte-range blocks, absolute line numbers, rejects kept, clear errors."""

from __future__ import annotations

import gzip

import pyarrow.parquet as pq
import pytest
from conftest import event, jsonl, rees46_sample

from flyray.clickstream.config import IngestConfig
from flyray.clickstream.ingest import IngestError, bucket_of, ingest

# Every test here but one or two runs on Ray: the session's local Ray for the module.
pytestmark = pytest.mark.usefixtures("ray_cluster")

TINY_BLOCKS = IngestConfig(block_mb=0, max_reject_fraction=0.5)


def _events(report):
    return pq.read_table(report.events_uri)


def test_many_blocks_keep_every_event_once_and_number_rejects_absolutely(tmp_path, monkeypatch):
    # block_mb=0 is refused by the planner, so force 4 KB blocks through the config path.
    lines = [
        event(i, i % 7, ts=f"2024-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z") for i in range(3000)
    ]
    lines[1234] = "{broken"
    lines[2999] = event(user=-1)
    src = tmp_path / "clicks.jsonl"
    src.write_bytes(jsonl(*lines))
    monkeypatch.setattr("flyray.clickstream.ingest._block_bytes", lambda cfg: 4096)
    report = ingest(str(src), str(tmp_path / "out"), TINY_BLOCKS)
    assert report.blocks > 40
    assert report.events == 2998 and report.rejects == 2
    table = _events(report)
    assert sorted(table["user_id"].to_pylist()) == sorted(set(range(3000)) - {1234, 2999})
    rejects = pq.read_table(report.rejects_uri).to_pylist()
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (1235, "malformed_line"),
        (3000, "negative_id"),
    ]
    assert rejects[0]["raw"] == "{broken" and rejects[0]["source"] == str(src)


def test_events_are_partitioned_by_user_bucket(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_bytes(jsonl(*[event(u, 1) for u in range(100)]))
    report = ingest(str(src), str(tmp_path / "out"), IngestConfig(n_buckets=4))
    for bucket in range(4):
        part = pq.read_table(f"{report.events_uri}/bucket={bucket}")
        users = part["user_id"].to_numpy()
        assert (bucket_of(users, 4) == bucket).all()


def test_rees46_directory_glob_and_gzip(tmp_path):
    data = rees46_sample().read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_bytes(data)
    (tmp_path / "in" / "b.csv.gz").write_bytes(gzip.compress(data))
    (tmp_path / "in" / "notes.txt").write_text("ignored: not an input suffix")
    report = ingest(str(tmp_path / "in"), str(tmp_path / "o1"))
    assert report.files == 2 and report.events == 2000 and report.rejects == 0
    assert report.events_by_type == {"view": 1974, "cart": 6, "remove_from_cart": 0, "purchase": 20}
    report = ingest(str(tmp_path / "in" / "*.csv"), str(tmp_path / "o2"))
    assert report.files == 1 and report.events == 1000


def test_rerun_into_same_output_does_not_duplicate(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_bytes(jsonl(*[event(u, 1) for u in range(50)]))
    for _ in range(2):
        report = ingest(str(src), str(tmp_path / "out"))
    assert _events(report).num_rows == 50


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found: .*nowhere"):
        ingest(str(tmp_path / "nowhere.jsonl"), str(tmp_path / "out"))


def test_empty_inputs_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(IngestError, match="input is empty"):
        ingest(str(tmp_path / "empty.jsonl"), str(tmp_path / "o1"))
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n   \n")
    with pytest.raises(IngestError, match="no records"):
        ingest(str(tmp_path / "blank.jsonl"), str(tmp_path / "o2"))
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="no input files"):
        ingest(str(tmp_path / "d"), str(tmp_path / "o3"))


def test_too_many_rejects_fail_with_counts_and_keep_the_rejects(tmp_path):
    lines = [event(u) for u in range(90)] + [event(etype="zap")] * 6 + ["nope"] * 4
    src = tmp_path / "c.jsonl"
    src.write_bytes(jsonl(*lines))
    with pytest.raises(IngestError) as err:
        ingest(str(src), str(tmp_path / "out"), IngestConfig(max_reject_fraction=0.05))
    message = str(err.value)
    assert "10 of 100 records rejected" in message
    assert "malformed_line=4" in message and "unknown_event_type=6" in message
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet")
    assert rejects.num_rows == 10  # kept even though the run failed
    assert "rejects.parquet" in message


def test_csv_without_required_columns_names_them(tmp_path):
    src = tmp_path / "c.csv"
    src.write_text("event_time,event_type,price\n2019-10-01 00:00:00 UTC,view,1.0\n")
    with pytest.raises(IngestError, match=r"c.csv: CSV header lacks \['user_id', 'item_id'\]"):
        ingest(str(src), str(tmp_path / "out"))
