"""flyray.storage: atomic writes, verifiable completion markers, one parquet reader."""

from __future__ import annotations

import json

import boto3
import pyarrow as pa
import pytest

from flyray import storage


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    fs, folder = storage.filesystem(str(tmp_path / "out"))
    with pytest.raises(RuntimeError), storage.atomic_output(fs, f"{folder}/model.bin") as fh:
        fh.write(b"half of a model")
        raise RuntimeError("killed mid-write")
    assert not (tmp_path / "out" / "model.bin").exists()
    assert list((tmp_path / "out").iterdir()) == []  # nor a staging file
    storage.write_atomic(fs, f"{folder}/model.bin", b"all of it")
    assert (tmp_path / "out" / "model.bin").read_bytes() == b"all of it"


def test_the_marker_vouches_for_exactly_the_files_it_lists(tmp_path):
    uri = str(tmp_path / "out")
    fs, folder = storage.filesystem(uri)
    storage.write_table(fs, f"{folder}/part=1/a.parquet", pa.table({"x": [1, 2]}))
    storage.write_atomic(fs, f"{folder}/report.json", b"{}")
    assert not storage.is_complete(uri)  # no marker yet
    storage.mark_complete(uri)
    assert storage.is_complete(uri)
    marker = (tmp_path / "out" / "_SUCCESS").read_text()
    assert set(json.loads(marker)["files"]) == {"part=1/a.parquet", "report.json"}

    for damaged in (marker[: len(marker) // 2], marker.replace("report", "rep0rt"), "", "[]"):
        (tmp_path / "out" / "_SUCCESS").write_text(damaged)
        assert not storage.is_complete(uri), damaged
    (tmp_path / "out" / "_SUCCESS").write_text(marker)
    assert storage.is_complete(uri)
    (tmp_path / "out" / "report.json").write_text("{ }")  # changed after the marker
    assert not storage.is_complete(uri)
    storage.mark_complete(uri)
    (tmp_path / "out" / "extra.parquet").write_bytes(b"")  # appeared after the marker
    assert not storage.is_complete(uri)
    assert not storage.is_complete(str(tmp_path / "missing"))


def test_read_table_reads_files_and_folders_locally_and_on_s3(tmp_path, s3_env):
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket="tables")
    for root in (str(tmp_path), "s3://tables/t"):
        fs, folder = storage.filesystem(root)
        storage.write_table(fs, f"{folder}/dir/part-0.parquet", table.slice(0, 2))
        storage.write_table(fs, f"{folder}/dir/part-1.parquet", table.slice(2))
        storage.mark_complete(storage.join(root, "dir"))  # markers are not read as data
        assert storage.read_table(storage.join(root, "dir")).sort_by("a").equals(table)
        one = storage.read_table(storage.join(root, "dir", "part-1.parquet"), columns=["b"])
        assert one.to_pylist() == [{"b": "z"}]
        assert storage.is_complete(storage.join(root, "dir"))
