"""A corpus of malformed clickstream inputs: each ends in counted, kept rejects (file, line,
reason) or in a clear error naming the file; never a hang, never Ray's traceback alone."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest
from ray.exceptions import RayError

from flyray.clickstream.config import FeatureConfig, IngestConfig
from flyray.clickstream.features import build_features
from flyray.clickstream.ingest import IngestError, ingest

GOOD = {"user_id": 1, "item_id": 2, "event_type": "view",
        "timestamp": "2024-01-01T00:00:00Z", "session_id": "s1"}  # fmt: skip
HEADER = (
    b"event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
)

# Every test here but one or two runs on Ray: the session's local Ray for the module.
pytestmark = pytest.mark.usefixtures("ray_cluster")
CSV_ROW = b"2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde\n"


def line(**changes) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


def raw(text: str) -> bytes:
    return text.encode()


OK = line()
DEEP = b'{"user_id": 1, "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"  # past any recursion limit


def zstd(data: bytes) -> bytes:
    import pyarrow as pa

    return pa.compress(data, codec="zstd", asbytes=True)


# name, file name, content, expected: {reason: count} of rejects (with the 1-based line of the
# first) for inputs that keep their good records, or (error type, message pattern) otherwise.
REJECTS = [
    ("truncated JSON", "a.jsonl", OK + b"\n" + OK[:30] + b"\n", {"malformed_line": 1}, 2),
    ("id as text", "a.jsonl", OK + b"\n" + line(user_id="abc") + b"\n", {"wrong_type": 1}, 2),
    ("fractional id", "a.jsonl", OK + b"\n" + line(item_id=2.5) + b"\n", {"wrong_type": 1}, 2),
    ("boolean id", "a.jsonl", OK + b"\n" + line(item_id=True) + b"\n", {"wrong_type": 1}, 2),
    ("NaN id", "a.jsonl", OK + b"\n" + OK.replace(b'"user_id": 1', b'"user_id": NaN') + b"\n",
     {"wrong_type": 1}, 2),
    ("Infinity id", "a.jsonl", OK + b"\n" + OK.replace(b'"item_id": 2', b'"item_id": Infinity')
     + b"\n", {"wrong_type": 1}, 2),
    ("id beyond int64", "a.jsonl", OK + b"\n" + OK.replace(b'"user_id": 1', b'"user_id": 1' + b"0" * 25)
     + b"\n", {"wrong_type": 1}, 2),
    ("negative id", "a.jsonl", OK + b"\n" + line(user_id=-5) + b"\n", {"negative_id": 1}, 2),
    ("unknown event type", "a.jsonl", OK + b"\n" + line(event_type="hover") + b"\n",
     {"unknown_event_type": 1}, 2),
    ("null field", "a.jsonl", OK + b"\n" + line(item_id=None) + b"\n", {"missing_field": 1}, 2),
    ("missing field", "a.jsonl", OK + b"\n" + raw('{"user_id": 1, "event_type": "view"}') + b"\n",
     {"missing_field": 1}, 2),
    ("unparseable timestamp", "a.jsonl", OK + b"\n" + line(timestamp="yesterday") + b"\n",
     {"unparseable_timestamp": 1}, 2),
    ("timestamp as an object", "a.jsonl", OK + b"\n" + line(timestamp={"d": 1}) + b"\n",
     {"unparseable_timestamp": 1}, 2),
    ("session id as an object", "a.jsonl", OK + b"\n" + line(session_id={"a": 1}) + b"\n",
     {"wrong_type": 1}, 2),
    ("non-UTF-8 bytes", "a.jsonl", OK + b"\n" + OK.replace(b'"view"', b'"vi\xff\xfeew"') + b"\n" + OK
     + b"\n", {"malformed_line": 1}, 2),
    ("a line that is a JSON array", "a.jsonl", OK + b"\n[1, 2, 3]\n", {"malformed_line": 1}, 2),
    ("CSV price and product id not numbers", "a.csv",
     HEADER + CSV_ROW + CSV_ROW.replace(b"44600062", b"notanumber"), {"wrong_type": 1}, 3),
    ("CSV row with a column missing", "a.csv", HEADER + CSV_ROW + b"2019-10-01 00:00:00 UTC,view\n",
     {"malformed_line": 1}, 3),
    ("a 100 MB single line", "a.jsonl",
     OK + b"\n" + b'{"user_id": 1, "pad": "' + b"x" * 100_000_000 + b'"}\n' + OK + b"\n",
     {"line_too_long": 1}, 2),
    ("a 3 MB CSV row", "a.csv", HEADER + CSV_ROW + b"x" * 3_000_000 + b"\n" + CSV_ROW,
     {"line_too_long": 1}, 3),
    ("a record nested 20,000 deep", "a.jsonl", OK + b"\n" + DEEP + b"\n" + OK + b"\n",
     {"nested_too_deep": 1}, 2),
    ("a record nested 20,000 deep, gzipped", "a.jsonl.gz",
     gzip.compress(OK + b"\n" + DEEP + b"\n" + OK + b"\n"), {"nested_too_deep": 1}, 2),
    ("a 100 MB line in a zstd stream", "a.jsonl.zst",
     zstd(OK + b"\n" + b'{"pad": "' + b"y" * 100_000_000 + b'"}\n' + OK + b"\n"),
     {"line_too_long": 1}, 2),
]  # fmt: skip
ERRORS = [
    ("empty file", "a.jsonl", b"", IngestError, "input is empty"),
    ("only blank lines", "a.jsonl", b"\n  \n\n", IngestError, "every line is blank"),
    ("header-only CSV", "a.csv", HEADER, IngestError, "no records"),
    ("CSV without the required columns", "a.csv", b"a,b,c\n1,2,3\n", IngestError,
     r"CSV header lacks \['user_id', 'item_id', 'event_type', 'timestamp'\]"),
    ("a whole file of JSON arrays", "a.jsonl", raw(f"[{OK.decode()}]\n"), IngestError,
     r"every one of 1 records .* was rejected \(malformed_line=1\)"),
    ("binary garbage", "a.jsonl", bytes(range(256)) * 40, IngestError, "was rejected"),
    ("corrupt gzip", "a.jsonl.gz", gzip.compress(OK * 5000)[:300], IngestError,
     "not a readable gzip file"),
    ("every session id a list", "a.jsonl", line(session_id=[1, 2]) + b"\n", IngestError,
     r"rejected \(wrong_type=1\)"),
    ("UTF-16 with a byte-order mark", "a.jsonl", (OK + b"\n").decode().encode("utf-16"),
     IngestError, r"UTF-16 \(little-endian\) text; flyray reads UTF-8"),
    ("UTF-16 without one, gzipped", "a.csv.gz", gzip.compress((HEADER + CSV_ROW).decode()
     .encode("utf-16-be")), IngestError, r"UTF-16 \(no byte-order mark\)"),
]  # fmt: skip
LENIENT = IngestConfig(max_reject_fraction=1.0)


def _input(folder, filename: str, content: bytes):
    (folder / filename).write_bytes(content)
    return folder / filename


@pytest.mark.parametrize("name, filename, content, reasons, bad_line", REJECTS,
                         ids=[c[0] for c in REJECTS])  # fmt: skip
def test_bad_records_are_counted_and_kept(tmp_path, name, filename, content, reasons, bad_line):
    src = _input(tmp_path, filename, content)
    report = ingest(str(src), str(tmp_path / "out"), LENIENT)
    assert {r: n for r, n in report.rejects_by_reason.items() if n} == reasons
    assert report.events >= 1  # the good records around it are kept
    [reject] = pq.read_table(report.rejects_uri).to_pylist()
    assert (reject["source"], reject["line"]) == (str(src), bad_line)
    assert reject["reason"] in reasons and reject["detail"]
    assert len(reject["raw"]) < 70_000  # a huge line is kept truncated, not whole


@pytest.mark.parametrize("name, filename, content, error, message", ERRORS,
                         ids=[c[0] for c in ERRORS])  # fmt: skip
def test_unusable_inputs_are_clear_errors(tmp_path, name, filename, content, error, message):
    src = str(_input(tmp_path, filename, content))
    with pytest.raises(error, match=message) as caught:
        ingest(src, str(tmp_path / "out"))
    assert not isinstance(caught.value, RayError)  # our message, not a Ray traceback
    assert src in str(caught.value)


def test_missing_inputs_are_clear_errors(tmp_path):
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "empty-dir" / "notes.txt").write_text("not an input suffix")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ingest(str(tmp_path / "nowhere" / "*.jsonl"), str(tmp_path / "o1"))
    with pytest.raises((FileNotFoundError, IngestError), match="empty-dir"):
        ingest(str(tmp_path / "empty-dir"), str(tmp_path / "o2"))


def test_duplicated_rows_are_removed_and_counted(tmp_path):
    src = tmp_path / "dups.jsonl"
    other = line(user_id=7, item_id=9, timestamp="2024-01-02T00:00:00Z")
    src.write_bytes(b"\n".join([OK, OK, OK, other, other]) + b"\n")
    report = ingest(str(src), str(tmp_path / "out"))
    assert report.events == 5 and report.rejects == 0
    lenient = FeatureConfig(min_item_interactions=1, min_user_interactions=1)
    profile = build_features(report.events_uri, str(tmp_path / "features"), lenient, report)
    assert profile.duplicates_removed == 3


def test_a_decompression_bomb_fails_naming_the_file_and_the_bound(tmp_path):
    """Streamed, the expansion is bounded by ingest_config.max_expanded_gb, not by memory."""
    src = _input(tmp_path, "bomb.jsonl.gz", gzip.compress((OK + b"\n") * 40_000))  # 5.2 MB
    config = IngestConfig(max_expanded_gb=0.004, block_mb=1)
    with pytest.raises(IngestError, match=r"bomb\.jsonl\.gz: expands past 0\.004 GB"):
        ingest(str(src), str(tmp_path / "out"), config)
    report = ingest(str(src), str(tmp_path / "ok"), IngestConfig(block_mb=1))
    assert report.events == 40_000 and report.rejects == 0  # 6 chunks of 1 MB, none lost
