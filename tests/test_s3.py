"""s3:// paths against a real S3-compatible server process on loopback (moto server mode)."""

from __future__ import annotations

import boto3
import pyarrow.parquet as pq
import pytest
from conftest import event, jsonl, rees46_sample

from flyray import storage
from flyray.clickstream.features import build_features
from flyray.clickstream.ingest import ingest


def _bucket(endpoint: str, name: str):
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing-key",
        aws_secret_access_key="testing-secret",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=name)
    return s3


def test_ingest_and_features_from_and_to_s3(s3_env):
    s3 = _bucket(s3_env, "clicks")
    s3.put_object(Bucket="clicks", Key="raw/2019-10/sample.csv", Body=rees46_sample().read_bytes())
    lines = [event(u, 7, ts=f"2024-01-01T00:00:{u:02d}Z") for u in range(40)] + ["{oops"]
    s3.put_object(Bucket="clicks", Key="raw/extra/part-0.jsonl", Body=jsonl(*lines))
    report = ingest("s3://clicks/raw/", "s3://clicks/prepared/ingest")
    assert report.files == 2
    assert report.events == 1040 and report.rejects == 1
    assert report.events_uri == "s3://clicks/prepared/ingest/events"
    fs, path = storage.filesystem(report.rejects_uri)
    rejects = pq.read_table(path, filesystem=fs).to_pylist()
    assert rejects[0]["source"] == "s3://clicks/raw/extra/part-0.jsonl" and rejects[0]["line"] == 41
    profile = build_features(
        report.events_uri, "s3://clicks/prepared/features", ingest_report=report
    )
    assert profile.events == 1040
    keys = {
        o["Key"]
        for o in s3.list_objects_v2(Bucket="clicks", Prefix="prepared/features/")["Contents"]
    }
    assert "prepared/features/id_maps/users.parquet" in keys
    assert any(k.startswith("prepared/features/train/part-") for k in keys)


def test_s3_glob_and_fingerprint_follow_object_changes(s3_env):
    s3 = _bucket(s3_env, "fingerprints")
    s3.put_object(Bucket="fingerprints", Key="a/x.jsonl", Body=jsonl(event(1)))
    s3.put_object(
        Bucket="fingerprints",
        Key="a/y.csv",
        Body=b"user_id,item_id,event_type,timestamp\n1,2,view,1\n",
    )
    files = storage.list_input_files("s3://fingerprints/a/*.jsonl", (".jsonl",))
    assert [f.path for f in files] == ["s3://fingerprints/a/x.jsonl"]
    before = storage.fingerprint(files)
    s3.put_object(Bucket="fingerprints", Key="a/x.jsonl", Body=jsonl(event(1), event(2)))
    after = storage.fingerprint(
        storage.list_input_files("s3://fingerprints/a/*.jsonl", (".jsonl",))
    )
    assert before != after


def test_missing_s3_object_is_a_clear_error(s3_env):
    _bucket(s3_env, "empty-bucket")
    with pytest.raises(FileNotFoundError, match="input not found: s3://empty-bucket/none.jsonl"):
        ingest("s3://empty-bucket/none.jsonl", "s3://empty-bucket/out")
