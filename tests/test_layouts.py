"""Source layouts: every preset read from its real sample (or a fixture in its documented
layout), recognised by `auto`, sessions standing in for users, custom layouts from JSON as
pyflyte passes them, and bad records kept with file, line and reason in every layout."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import shared_data
from flytekit.interaction.click_types import JsonParamType

from flyray.clickstream.config import IngestConfig
from flyray.clickstream.ingest import IngestError, ingest
from flyray.clickstream.layouts import PRESETS, Layout, detect, first_line
from flyray.clickstream.parse import SESSION_USER_BASE, parse_block

DATA = Path(__file__).parent / "data"
LENIENT = IngestConfig(max_reject_fraction=1.0)


def taobao() -> Path:
    return shared_data("clickstream", "taobao-userbehavior-sample.csv")


def diginetica() -> Path:
    return shared_data("clickstream", "diginetica-item-views-sample.csv")


def rees46() -> Path:
    return shared_data("clickstream", "rees46-2019-oct-sample.csv")


def retailrocket() -> Path:
    return DATA / "retailrocket-events.csv"  # header timestamp,visitorid,event,itemid,transactionid


def yoochoose() -> Path:
    return DATA / "yoochoose-clicks.dat"  # no header: session, ISO time, item, category


# (preset, file, events, {type: count}) as documented in shared/data/README.md for the samples,
# and as written in the fixtures (137 views, 30 add-to-carts, 14 transactions; 168 clicks).
SAMPLES = [
    ("rees46", rees46, 1000, {"view": 987, "cart": 3, "purchase": 10}),
    ("taobao", taobao, 10_000, {"view": 9046, "cart": 536 + 212, "purchase": 206}),  # fav: cart
    ("diginetica", diginetica, 12_391, {"view": 12_391}),
    ("retailrocket", retailrocket, 181, {"view": 137, "cart": 30, "purchase": 14}),
    ("yoochoose", yoochoose, 168, {"view": 168}),
]
IDS = [s[0] for s in SAMPLES]


def _by_type(report) -> dict[str, int]:
    return {t: n for t, n in report.events_by_type.items() if n}


@pytest.mark.parametrize("preset, path, events, by_type", SAMPLES, ids=IDS)
@pytest.mark.usefixtures("ray_cluster")
def test_auto_recognises_each_preset_and_reads_it_like_the_preset(
    tmp_path, preset, path, events, by_type
):
    src = path()
    auto = ingest(str(src), str(tmp_path / "auto"))
    assert (auto.layout, auto.events, auto.rejects) == (preset, events, 0)
    assert _by_type(auto) == by_type
    assert auto.layout_reason  # the report says why, e.g. "the header has ..." / "no header; ..."
    named = ingest(str(src), str(tmp_path / "named"), IngestConfig(layout=preset))
    assert named.layout_reason == f"ingest_config.layout is {preset!r}"
    assert sorted(pq.read_table(named.events_uri).to_pylist(), key=str) == sorted(
        pq.read_table(auto.events_uri).to_pylist(), key=str
    )


def test_auto_says_why_from_the_first_line():
    layout, why = detect(first_line(taobao().read_bytes()), "UserBehavior.csv")
    assert layout.name == "taobao" and why.startswith("no header; the first line '999477,")
    layout, why = detect(b"sessionId;userId;itemId;timeframe;eventdate", "train-item-views.csv")
    assert layout.name == "diginetica"  # the original CIKM Cup header is camelCase
    layout, why = detect(b"timestamp,visitorid,event,itemid,transactionid", "events.csv")
    assert layout.name == "retailrocket" and "visitorid" in why
    layout, _ = detect(b'{"user_id": 1, "item_id": 2, "event_type": "view"}', "x.jsonl")
    assert layout.name == "jsonl"


def test_taobao_fields_and_epoch_seconds():
    result = parse_block(taobao().read_bytes(), "taobao")
    events = result.events
    assert len(set(events["user_id"].to_pylist())) == 114
    first = events.slice(0, 1).to_pylist()[0]  # 999477,2200475,3607361,pv,1511848894
    assert (first["user_id"], first["item_id"]) == (999477, 2200475)
    assert first["ts"] == datetime.fromtimestamp(1511848894, UTC)
    stamps = events["ts"].to_pylist()
    assert (
        datetime(2017, 11, 1, tzinfo=UTC)
        < min(stamps)
        < max(stamps)
        < datetime(2017, 12, 31, tzinfo=UTC)
    )


def test_diginetica_time_is_date_plus_timeframe_and_anonymous_sessions_stand_in():
    data = diginetica().read_bytes()
    lines = data.decode().splitlines()
    known = sum(1 for row in lines[1:] if row.split(";")[1] != "NA")
    result = parse_block(data, "diginetica")
    assert result.n_rejects == 0 and result.events.num_rows == 12_391
    assert result.session_users == 12_391 - known  # every NA user row, and only those
    first = result.events.slice(0, 1).to_pylist()[0]  # 1;NA;81766;526309;2016-05-09
    assert first["ts"] == datetime(2016, 5, 9, tzinfo=UTC) + (
        datetime.fromtimestamp(526.309, UTC) - datetime.fromtimestamp(0, UTC)
    )
    assert first["user_id"] == SESSION_USER_BASE + 1 and first["session_id"] == "1"
    real = result.events.filter(np.asarray(result.events["user_id"]) < SESSION_USER_BASE)
    assert real.num_rows == known  # logged-in users keep their own ids


@pytest.mark.usefixtures("ray_cluster")
def test_user_key_session_and_the_fallback_count_in_the_report(tmp_path):
    by_user = ingest(str(diginetica()), str(tmp_path / "u"))
    known = sum(1 for r in diginetica().read_text().splitlines()[1:] if r.split(";")[1] != "NA")
    assert by_user.user_key == "user" and by_user.session_users == 12_391 - known
    by_session = ingest(str(diginetica()), str(tmp_path / "s"), IngestConfig(user_key="session"))
    assert by_session.session_users == 12_391
    users = pq.read_table(by_session.events_uri)["user_id"].to_numpy()
    assert len(np.unique(users)) == 2986 and (users >= SESSION_USER_BASE).all()  # 2,986 sessions
    clicks = ingest(str(yoochoose()), str(tmp_path / "y"))
    assert clicks.session_users == clicks.events == 168  # no user column at all
    assert len(np.unique(pq.read_table(clicks.events_uri)["user_id"].to_numpy())) == 40


def test_uuid_sessions_become_stable_users():
    rows = [
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session",
        "2019-10-01 00:00:00 UTC,view,10,1,,,1.0,,72d76fde-8bb3-4e00-8c23-a032dfed738c",
        "2019-10-01 00:00:01 UTC,cart,11,1,,,1.0,,72d76fde-8bb3-4e00-8c23-a032dfed738c",
        "2019-10-01 00:00:02 UTC,view,12,1,,,1.0,,9333dfbd-b87a-4708-9857-6336556b0fcc",
        "2019-10-01 00:00:03 UTC,view,12,1,,,1.0,541312140,9333dfbd-b87a-4708-9857-6336556b0fcc",
    ]
    data = ("\n".join(rows) + "\n").encode()
    first, again = parse_block(data, "rees46"), parse_block(data, "rees46")
    users = first.events["user_id"].to_pylist()
    assert users == again.events["user_id"].to_pylist()  # the same on every worker and run
    assert users[0] == users[1] != users[2] and users[3] == 541312140
    assert min(users[:3]) >= SESSION_USER_BASE and first.session_users == 3


@pytest.mark.usefixtures("ray_cluster")
def test_custom_layout_from_pyflyte_json(tmp_path):
    # Pipe-separated, no header, columns by position, own event names, local wall-clock time.
    src = tmp_path / "shop.tsv"
    src.write_text(
        "2024-03-01 08:00:00|u7|like|  42|5\n"
        "2024-03-01 08:05:00|u7|order|42|5\n"
        "2024-03-01 09:00:00|u8|like|43|6\n"
    )
    as_json = (
        '{"layout": "custom", "custom_layout": {"header": false, "delimiter": "|", '
        '"user": "4", "item": 3, "event": "2", "timestamp": "0", "session": "1", '
        '"events": {"like": "view", "order": "purchase"}, '
        '"time_format": "%Y-%m-%d %H:%M:%S", "time_zone": "Asia/Shanghai"}}'
    )
    config = JsonParamType(IngestConfig).convert(as_json, None, None)  # what pyflyte run does
    report = ingest(str(src), str(tmp_path / "out"), config)
    assert (report.layout, report.layout_reason) == ("custom", "ingest_config.custom_layout")
    assert report.rejects == 0 and _by_type(report) == {"view": 2, "purchase": 1}
    rows = sorted(pq.read_table(report.events_uri).to_pylist(), key=lambda r: r["ts"])
    assert [r["item_id"] for r in rows] == [42, 42, 43]  # "  42" trimmed
    assert [r["user_id"] for r in rows] == [5, 5, 6] and rows[0]["session_id"] == "u7"
    assert rows[0]["ts"] == datetime(2024, 3, 1, 0, 0, tzinfo=UTC)  # 08:00 in Shanghai


@pytest.mark.usefixtures("ray_cluster")
def test_every_row_is_a_view_and_named_json_keys(tmp_path):
    src = tmp_path / "clicks.jsonl"
    src.write_text(
        '{"who": 1, "sku": 10, "at": 1700000000000}\n{"who": 2, "sku": 11, "at": 1700000001000}\n'
    )
    layout = Layout(
        format="jsonl", user="who", item="sku", event="", timestamp="at", time_unit="ms"
    )
    report = ingest(str(src), str(tmp_path / "out"), IngestConfig(custom_layout=layout))
    assert report.events == 2 and _by_type(report) == {"view": 2}
    stamps = pq.read_table(report.events_uri).sort_by("user_id")["ts"].to_pylist()
    assert stamps[0] == datetime.fromtimestamp(1_700_000_000, UTC)
    (tmp_path / "bad.jsonl").write_text(src.read_text() + '{"who": "x", "sku": 10, "at": 1}\n')
    bad = ingest(str(tmp_path / "bad.jsonl"), str(tmp_path / "o2"), IngestConfig(
        custom_layout=layout, max_reject_fraction=1.0))  # fmt: skip
    [reject] = pq.read_table(bad.rejects_uri).to_pylist()
    assert (reject["line"], reject["reason"], reject["field"]) == (3, "wrong_type", "user_id")
    assert "'who' (user_id)" in reject["detail"]  # the message names the user's own column


# One good row, then a bad one (line 2 of a headerless file, line 3 with a header).
BAD_ROWS = [
    ("taobao", "u.csv", "1,2,3,pv,1511848894\n1,x2,3,pv,1511848894\n", 2, "wrong_type", "item_id"),
    ("taobao", "u.csv", "1,2,3,pv,1511848894\n1,2,3,like,1511848894\n", 2,
     "unknown_event_type", "event_type"),
    ("retailrocket", "events.csv", "timestamp,visitorid,event,itemid,transactionid\n"
     "1433221332117,257597,view,355908,\n1433221332117,257597,view,355908\n", 3,
     "malformed_line", None),
    ("retailrocket", "events.csv", "timestamp,visitorid,event,itemid,transactionid\n"
     "1433221332117,257597,view,355908,\nsoon,257597,view,355908,\n", 3,
     "unparseable_timestamp", "timestamp"),
    ("diginetica", "views.csv", "session_id;user_id;item_id;timeframe;eventdate\n"
     "1;NA;81766;526309;2016-05-09\n1;NA;81766;526309;2016-13-09\n", 3,
     "unparseable_timestamp", "timestamp"),
    ("diginetica", "views.csv", "session_id;user_id;item_id;timeframe;eventdate\n"
     "1;NA;81766;526309;2016-05-09\n;NA;81766;526309;2016-05-09\n", 3,
     "missing_field", "user_id"),
    ("yoochoose", "clicks.dat", "1,2014-04-07T10:51:09.277Z,214536502,0\n"
     "2,2014-04-07T10:51:09.277Z,-4,0\n", 2, "negative_id", "item_id"),
]  # fmt: skip


@pytest.mark.parametrize("preset, name, text, line, reason, field", BAD_ROWS)
@pytest.mark.usefixtures("ray_cluster")
def test_bad_records_are_kept_with_file_line_and_reason_in_every_layout(
    tmp_path, preset, name, text, line, reason, field
):
    src = tmp_path / name
    src.write_text(text)
    for config in (LENIENT, IngestConfig(layout=preset, max_reject_fraction=1.0)):
        report = ingest(str(src), str(tmp_path / "out"), config)
        assert (report.layout, report.events, report.rejects) == (preset, 1, 1)
        [reject] = pq.read_table(report.rejects_uri).to_pylist()
        assert (reject["source"], reject["line"]) == (str(src), line)
        assert (reject["reason"], reject["field"]) == (reason, field)
        assert reject["raw"] == text.splitlines()[line - 1] and reject["detail"]


@pytest.mark.usefixtures("ray_cluster")
def test_block_parallel_ingest_numbers_lines_across_blocks(tmp_path, monkeypatch):
    lines = diginetica().read_bytes().split(b"\n")
    lines[9000] = b"77;NA;oops;100;2016-05-09"
    src = tmp_path / "views.csv"
    src.write_bytes(b"\n".join(lines))  # and, like the sample, no final newline
    monkeypatch.setattr("flyray.clickstream.ingest._block_bytes", lambda cfg: 4096)
    report = ingest(str(src), str(tmp_path / "out"), LENIENT)
    assert report.blocks > 50 and report.layout == "diginetica"
    assert (report.events, report.rejects) == (12_390, 1)  # the header is read once, not per block
    [reject] = pq.read_table(report.rejects_uri).to_pylist()
    assert (reject["line"], reject["field"]) == (9001, "item_id")


@pytest.mark.usefixtures("ray_cluster")
def test_a_directory_of_mixed_layouts_reports_each(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dat").write_bytes(yoochoose().read_bytes())
    (tmp_path / "in" / "b.csv").write_bytes(retailrocket().read_bytes())
    report = ingest(str(tmp_path / "in"), str(tmp_path / "out"))
    assert report.events == 168 + 181 and report.layout == "yoochoose, retailrocket"
    assert "yoochoose (1 file(s)): no header" in report.layout_reason


def test_wrong_or_unknown_layouts_are_clear_errors(tmp_path):
    src = tmp_path / "events.csv"
    src.write_bytes(retailrocket().read_bytes())
    with pytest.raises(
        IngestError, match=r"events.csv: layout 'rees46' expects a column 'user_id'"
    ):
        ingest(str(src), str(tmp_path / "o1"), IngestConfig(layout="rees46"))
    (tmp_path / "odd.csv").write_text("a;b;c\n1;2;3\n")
    with pytest.raises(IngestError, match=r"odd.csv: .*not a known layout.*ingest_config.layout"):
        ingest(str(tmp_path / "odd.csv"), str(tmp_path / "o2"))
    with pytest.raises(ValueError, match="unknown layout 'tabao'.*taobao"):
        IngestConfig(layout="tabao")
    with pytest.raises(ValueError, match="unknown types"):
        Layout(events={"like": "love"})
    with pytest.raises(ValueError, match="unknown time_zone"):
        Layout(time_zone="Mars/Olympus")
    with pytest.raises(ValueError, match="user_key"):
        IngestConfig(user_key="visitor")


def test_every_preset_is_documented():
    text = (Path(__file__).parents[1] / "docs" / "layouts.md").read_text()
    for name in PRESETS:
        assert f"`{name}`" in text and f'"layout": "{name}"' in text


@pytest.mark.e2e
@pytest.mark.parametrize("preset, path, events, by_type", SAMPLES, ids=IDS)
@pytest.mark.usefixtures("ray_cluster")
def test_prepare_data_on_each_sample_with_auto_and_its_preset(
    flyte_cache, preset, path, events, by_type
):
    from workflows.recommendation import prepare_data

    for layout in ("auto", preset):
        out = prepare_data(source=str(path()), ingest_config=IngestConfig(layout=layout))
        assert out.profile.events == events and out.profile.rejects == 0
        assert sum(out.profile.ratings_by_split.values()) > 0
        assert out.profile.ratings_by_split["train"] > 0
