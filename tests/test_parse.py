"""Block parsing and validation: every reject reason, with the line it came from."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import event, jsonl, rees46_sample

from flyray.clickstream.parse import Limits, parse_block
from flyray.clickstream.schema import EVENT_CODE


def _rejects(result):
    return list(zip(result.reject_lines, result.reject_reasons, result.reject_fields, strict=True))


def test_valid_json_lines_become_typed_events():
    data = jsonl(
        event(1, 10, "view", "2024-01-01T00:00:00Z"),
        event(2, 20, "add_to_cart", "2024-01-01 00:00:05 UTC"),
        event(3, 30, "Purchase", "2024-01-01T02:00:00+02:00"),
    )
    result = parse_block(data, "jsonl")
    assert result.n_rejects == 0
    rows = result.events.to_pylist()
    assert [r["user_id"] for r in rows] == [1, 2, 3]
    assert [r["event_code"] for r in rows] == [0, EVENT_CODE["cart"], EVENT_CODE["purchase"]]
    stamps = result.events["ts"].cast("int64").to_numpy() // 1_000_000
    assert stamps.tolist() == [1704067200, 1704067205, 1704067200]  # +02:00 normalised to UTC


@pytest.mark.parametrize(
    ("line", "reason", "field"),
    [
        (
            '{"user_id": 1, "item_id": 2, "event_type": "view", "timestamp": ',
            "malformed_line",
            None,
        ),
        ("[1, 2, 3]", "malformed_line", None),
        (event(user=None, session=None), "missing_field", "user_id"),  # no session to stand in
        (
            '{"user_id": 1, "event_type": "view", "timestamp": "2024-01-01T00:00:00Z"}',
            "missing_field",
            "item_id",
        ),
        (event(user="abc"), "wrong_type", "user_id"),
        (event(item=2.5), "wrong_type", "item_id"),
        (event(user=-4), "negative_id", "user_id"),
        (event(etype="teleport"), "unknown_event_type", "event_type"),
        (event(ts="next tuesday"), "unparseable_timestamp", "timestamp"),
        (event(ts="2024-02-30T00:00:00Z"), "unparseable_timestamp", "timestamp"),
    ],
)
def test_each_json_reject_reason_is_named_with_its_line(line, reason, field):
    data = jsonl(event(1), "", line, event(2))  # a blank line shifts the line number
    result = parse_block(data, "jsonl")
    assert _rejects(result) == [(2, reason, field)]
    assert result.reject_raw == [line]
    assert result.events["user_id"].to_pylist() == [1, 2]  # good neighbours are kept


def test_many_bad_lines_in_one_block_are_each_found():
    lines = [event(i, ts=f"2024-01-01T00:00:{i % 60:02d}Z") for i in range(200)]
    bad = {17: "garbage", 99: event(user="x"), 150: event(etype="nope")}
    for k, text in bad.items():
        lines[k] = text
    result = parse_block(jsonl(*lines), "jsonl")
    assert sorted(result.reject_lines) == sorted(bad)
    assert result.events.num_rows == 197


def test_epoch_timestamps_and_mixed_types_are_accepted():
    data = jsonl(
        event(1, ts=1704067200), event(2, ts="2024-01-01T00:00:01Z"), event(3, ts=1704067202500)
    )
    result = parse_block(data, "jsonl")
    assert result.n_rejects == 0
    secs = result.events.sort_by("user_id")["ts"].cast("int64").to_numpy() / 1e6
    np.testing.assert_allclose(secs, [1704067200, 1704067201, 1704067202.5])


def test_rees46_sample_parses_completely_despite_blank_brand_and_category():
    data = rees46_sample().read_bytes()
    result = parse_block(data, "rees46")
    assert result.n_rejects == 0
    assert result.events.num_rows == 1000
    codes = np.bincount(result.events["event_code"].to_numpy(), minlength=4)
    assert codes.tolist() == [987, 3, 0, 10]  # as documented in shared/data/README.md
    assert result.events["user_id"].to_numpy().min() > 0


def test_csv_rejects_name_their_lines():
    header = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
    rows = [
        header,
        "2019-10-01 00:00:00 UTC,view,44600062,1,,shiseido,35.79,541312140,s",
        "2019-10-01 00:00:01 UTC,view,3900821",
        "",
        "2019-10-01 00:00:02 UTC,cart,-5,1,,,1.0,541312140,s",
        "2019-10-01 00:00:03 UTC,view,17,1,,,1.0,12abc,s",
        "not a time,view,17,1,,,1.0,7,s",
        "2019-10-01 00:00:04 UTC,purchase,18,1,,,1.0,,",
        "2019-10-01 00:00:05 UTC,remove_from_cart,19,1,,,1.0,8,s",
    ]
    data = ("\n".join(rows) + "\n").encode()
    result = parse_block(data, "rees46")
    assert sorted(_rejects(result)) == [
        (2, "malformed_line", None),
        (4, "negative_id", "item_id"),
        (5, "wrong_type", "user_id"),
        (6, "unparseable_timestamp", "timestamp"),
        (7, "missing_field", "user_id"),
    ]
    assert result.events["item_id"].to_pylist() == [44600062, 19]


OK = b'{"user_id": 1, "item_id": 2, "event_type": "view", "timestamp": 1700000000}'


def _screened(lines: list[bytes], max_line_bytes: int):
    data = b"\n".join(lines) + b"\n"
    return parse_block(data, "jsonl", limits=Limits(max_line_bytes=max_line_bytes, max_depth=8))


def test_records_past_the_limits_are_rejected_before_any_parser():
    """A 20,000-deep record (json.loads would raise RecursionError) and an overlong line are
    rejected and counted; brackets inside strings do not count as depth."""
    deep = b'{"user_id": 1, "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    quoted = OK[:-1] + b', "pad": "' + b"[{" * 500 + b'\\"[["}'
    long = OK[:-1] + b', "pad": "' + b"z" * 60_000 + b'"}'
    result = _screened([OK, deep, quoted, long, OK], max_line_bytes=50_000)
    assert result.events.num_rows == 3
    assert [r[:2] for r in _rejects(result)] == [(1, "nested_too_deep"), (3, "line_too_long")]
    assert "nested 20,001 deep, over the limit of 8" in result.reject_details[0]


def test_a_compressed_stream_is_cut_into_whole_lines_in_bounded_memory():
    """Chunks end on line ends; a line over the limit is cut (one line still) and its rest
    skipped, so every other line arrives whole and line numbers hold."""
    import io

    from flyray.clickstream.ingest import Bounds, _expanded_chunks

    lines = [b"a" * 5, b"b" * 50, b"c" * 7, b"d" * 3]
    data = b"\n".join(lines) + b"\n"
    bounds = Bounds(chunk_bytes=8, limits=Limits(max_line_bytes=12), max_expanded_bytes=1000)
    chunks = list(_expanded_chunks(io.BytesIO(data), "s.gz", bounds))
    assert all(c.endswith(b"\n") for c in chunks)
    got = b"".join(chunks).split(b"\n")[:-1]
    assert got == [b"a" * 5, b"b" * 13, b"c" * 7, b"d" * 3]


def test_the_screen_finds_lines_after_a_long_one_and_stays_small_on_a_flood_of_lines():
    """A deep line after a long one is named by its own line; a block of 32 MB of blank lines
    (32 million lines) is screened without per-line arrays of the whole block."""
    import tracemalloc

    long = b'{"pad": "' + b"z" * 5000 + b'"}'
    deep = b'{"x": ' + b"[" * 50 + b"]" * 50 + b"}"
    result = _screened([OK, long, OK, deep, OK], max_line_bytes=1000)
    assert result.events.num_rows == 3
    assert [r[:2] for r in _rejects(result)] == [(1, "line_too_long"), (3, "nested_too_deep")]
    assert result.reject_raw[1].startswith('{"x": [[[')
    flood = OK + b"\n" + b"\n" * (32 << 20) + b"[" * 40 + b"\n" + OK + b"\n"
    tracemalloc.start()
    result = parse_block(flood, "jsonl")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result.events.num_rows == 2 and result.reject_reasons == ["nested_too_deep"]
    assert result.reject_lines == [1 + (32 << 20)]
    assert peak < 300 << 20, peak  # per-line int64 arrays of the block alone: 256 MB each
