"""Parse and validate one block of clickstream bytes into typed events and counted rejects.

A block is a run of whole lines from one file. The fast path hands the block to pyarrow's C++
JSON/CSV readers and validates with vectorised compute; only when pyarrow refuses a block does
it bisect to the offending lines and explain each one in Python, so bad records cost time in
proportion to how many there are, and good ones are never dropped with them.
"""

from __future__ import annotations

import codecs
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson

from flyray.clickstream.schema import (
    EVENT_ALIASES,
    EVENT_CODE,
    EVENTS_SCHEMA,
    FIELD_ALIASES,
    ID_FIELDS,
    REQUIRED_FIELDS,
)

_JSON_SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("item_id", pa.int64()), ("event_type", pa.string())]
)
_INT64_MAX = 2**63 - 1
_ISO_RE = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:?\d{2})?$"
_EPOCH_RE = r"^\d{9,13}(\.\d+)?$"
_RAW_KEEP = 65_536  # characters of a rejected line kept in rejects.parquet
_SMALL = 16  # below this many lines a failing chunk is explained line by line
_WS = np.frombuffer(b" \t\r\n", dtype=np.uint8)


@dataclass
class BlockResult:
    """Valid events (EVENTS_SCHEMA) plus rejects with 0-based line numbers inside the block."""

    events: pa.Table
    reject_lines: list[int]
    reject_reasons: list[str]
    reject_fields: list[str | None]
    reject_details: list[str]
    reject_raw: list[str]

    @property
    def n_rejects(self) -> int:
        return len(self.reject_lines)


class _Rejects:
    def __init__(self) -> None:
        self.lines: list[int] = []
        self.reasons: list[str] = []
        self.fields: list[str | None] = []
        self.details: list[str] = []
        self.raw: list[str] = []

    def add(self, line: int, reason: str, field: str | None, detail: str, raw: bytes | str) -> None:
        self.lines.append(int(line))
        self.reasons.append(reason)
        self.fields.append(field)
        self.details.append(detail)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if len(text) > _RAW_KEEP:  # file and line lead to the rest
            text = f"{text[:_RAW_KEEP]}... [{len(raw):,} bytes in all, truncated]"
        self.raw.append(text)


def _drop_invalid_utf8(data: bytes, rejects: _Rejects) -> bytes:
    """Reject the lines that are not UTF-8 and empty them, so the line numbers stay as they
    were (pyarrow would fail the whole block on them). Each byte is decoded once."""
    view, pos, parts, done = memoryview(data), 0, [], 0
    newlines = None
    while True:
        try:
            codecs.utf_8_decode(view[pos:], "strict", True)
            break
        except UnicodeDecodeError as exc:
            bad = pos + exc.start
        if newlines is None:
            newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
        line = int(np.searchsorted(newlines, bad))  # the number of lines before it
        start = int(newlines[line - 1]) + 1 if line else 0
        end = int(newlines[line]) if line < len(newlines) else len(data)
        detail = f"not valid UTF-8 (byte {bad - start + 1} of the line)"
        rejects.add(line, "malformed_line", None, detail, data[start:end])
        parts.append(data[done:start])
        done = pos = end
    if not parts:
        return data
    parts.append(data[done:])
    return b"".join(parts)


def nonblank_lines(data: bytes, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(line index, start, end) of the lines pyarrow reads as rows: its JSON reader skips
    whitespace-only lines, its CSV reader only empty ones."""
    buf = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], nl + 1))
    ends = np.concatenate((nl, [len(buf)]))
    if fmt == "jsonl":
        filled = np.concatenate(([0], np.cumsum(~np.isin(buf, _WS))))
        keep = filled[ends] - filled[starts] > 0
    else:
        keep = (ends > starts) & ~(
            (ends == starts + 1) & (buf[np.minimum(starts, len(buf) - 1)] == 13)
        )
    return np.flatnonzero(keep), starts[keep], ends[keep]


# ----------------------------------------------------------------------------------- JSON lines


def _explain_json_line(text: bytes) -> tuple[str, str | None, str] | None:
    """Why pyarrow refused this line, or None when the line is valid on its own."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return "malformed_line", None, f"invalid JSON: {exc}"
    if not isinstance(obj, dict):
        return "malformed_line", None, f"expected a JSON object, got {type(obj).__name__}"
    for field in REQUIRED_FIELDS:
        if obj.get(field) is None:
            return "missing_field", field, f"'{field}' is missing or null"
    for field in ID_FIELDS:
        value = obj[field]
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > _INT64_MAX:
            return "wrong_type", field, f"'{field}' must be a 64-bit integer, got {value!r}"
    if not isinstance(obj["event_type"], str):
        return (
            "wrong_type",
            "event_type",
            f"'event_type' must be a string, got {obj['event_type']!r}",
        )
    ts = obj["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, (str, int, float)):
        return "unparseable_timestamp", "timestamp", f"cannot read a timestamp from {ts!r}"
    session = obj.get("session_id")
    if isinstance(session, (dict, list)):
        return "wrong_type", "session_id", f"'session_id' must be text or a number, got {session!r}"
    return None


def _read_json(data: bytes) -> pa.Table:
    return pjson.read_json(
        io.BytesIO(data),
        read_options=pjson.ReadOptions(use_threads=False, block_size=max(1 << 20, len(data) + 1)),
        parse_options=pjson.ParseOptions(
            explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="infer"
        ),
    )


def _parse_json(
    data: bytes, rejects: _Rejects, use_threads: bool
) -> list[tuple[pa.Table, np.ndarray | int]]:
    """Tables with the line indices they came from (an int k: the nonblank lines from the k-th)."""
    try:
        if use_threads:
            table = pjson.read_json(
                io.BytesIO(data),
                parse_options=pjson.ParseOptions(
                    explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="infer"
                ),
            )
        else:
            table = _read_json(data)
        return [(table, 0)]
    except pa.ArrowInvalid:
        pass
    idx, starts, ends = nonblank_lines(data, "jsonl")
    lines = [data[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
    out: list[tuple[pa.Table, np.ndarray | int]] = []

    def bisect(lo: int, hi: int) -> None:
        if hi - lo > _SMALL:
            try:
                out.append((_read_json(b"\n".join(lines[lo:hi])), idx[lo:hi]))
                return
            except pa.ArrowInvalid:
                mid = (lo + hi) // 2
                bisect(lo, mid)
                bisect(mid, hi)
                return
        for k in range(lo, hi):
            why = _explain_json_line(lines[k])
            if why is None:
                try:
                    out.append((_read_json(lines[k]), idx[k : k + 1]))
                    continue
                except pa.ArrowInvalid as exc:
                    why = ("malformed_line", None, str(exc))
            rejects.add(idx[k], *why, lines[k])

    bisect(0, len(lines))
    return out


# ------------------------------------------------------------------------------------------ CSV


def _parse_csv(
    data: bytes,
    rejects: _Rejects,
    use_threads: bool,
    column_names: list[str],
    has_header: bool,
) -> list[tuple[pa.Table, np.ndarray | int]]:
    wanted = {name for names in FIELD_ALIASES.values() for name in names} & set(column_names)
    invalid: list[tuple[int | None, str]] = []

    def on_invalid(row) -> str:  # wrong number of columns: keep it, never drop it silently
        invalid.append((row.number, row.text))
        return "skip"

    table = pcsv.read_csv(
        io.BytesIO(data),
        read_options=pcsv.ReadOptions(
            column_names=column_names, skip_rows=1 if has_header else 0, use_threads=use_threads
        ),
        parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
        convert_options=pcsv.ConvertOptions(
            column_types={name: pa.string() for name in wanted}, include_columns=sorted(wanted)
        ),
    )
    first = 1 if has_header else 0
    if not invalid:
        return [(table, first)]
    idx, _, _ = nonblank_lines(data, "csv")
    taken = np.zeros(len(idx), dtype=bool)
    if has_header:
        taken[0] = True
    by_text: dict[str, list[int]] = {}
    for number, text in invalid:
        if number is not None:  # pyarrow counts nonblank rows from 1, the header included
            k = number - 1
        else:  # multi-threaded reads do not number rows: match the text instead
            if not by_text:
                all_lines = data.split(b"\n")
                for j in range(first, len(idx)):
                    text_j = all_lines[idx[j]].rstrip(b"\r").decode("utf-8", "replace")
                    by_text.setdefault(text_j, []).append(j)
            k = by_text[text].pop(0)
        taken[k] = True
        rejects.add(idx[k], "malformed_line", None, f"expected {len(column_names)} columns", text)
    return [(table, idx[~taken])]


# ----------------------------------------------------------------------------------- validation


def _canonical(table: pa.Table) -> dict[str, pa.ChunkedArray | None]:
    cols = {}
    for field, names in FIELD_ALIASES.items():
        cols[field] = next((table[n] for n in names if n in table.column_names), None)
    return cols


def _ids(col: pa.ChunkedArray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(values, missing, wrong_type, negative) for an id column given as int64 or as text."""
    if col is None:
        return np.zeros(n, np.int64), np.ones(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    if pa.types.is_integer(col.type):
        missing = col.is_null().to_numpy(zero_copy_only=False)
        values = col.fill_null(0).cast(pa.int64()).to_numpy()
        return values, missing, np.zeros(n, bool), values < 0
    text = pc.utf8_trim_whitespace(col.cast(pa.string()))
    missing = pc.fill_null(pc.equal(text, ""), True).to_numpy(zero_copy_only=False)
    is_int = pc.fill_null(pc.match_substring_regex(text, r"^-?\d{1,18}$"), False)
    is_int = is_int.to_numpy(zero_copy_only=False)
    values = pc.if_else(is_int, text, "0").cast(pa.int64()).to_numpy()
    wrong = ~missing & ~is_int
    return values, missing, wrong, values < 0


def _timestamps(col: pa.ChunkedArray | None, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epoch microseconds, missing, unparseable) from ISO-8601 text, REES46 text or epochs."""
    if col is None:
        return np.zeros(n, np.int64), np.ones(n, bool), np.zeros(n, bool)
    missing = col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_timestamp(col.type):
        us = col.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).fill_null(0).to_numpy()
        return us, missing, np.zeros(n, bool)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        secs = col.cast(pa.float64()).fill_null(0).to_numpy(zero_copy_only=False)
        return _epoch_us(secs), missing, np.zeros(n, bool)
    if pa.types.is_null(col.type):
        return np.zeros(n, np.int64), np.ones(n, bool), np.zeros(n, bool)
    text = pc.utf8_trim_whitespace(col.cast(pa.string()))
    missing |= pc.fill_null(pc.equal(text, ""), False).to_numpy(zero_copy_only=False)
    text = pc.replace_substring_regex(text, r" ?UTC$", "Z")
    iso = pc.fill_null(pc.match_substring_regex(text, _ISO_RE), False)
    zoned = pc.match_substring_regex(text, r"(Z|[+-]\d{2}:?\d{2})$")
    text = pc.if_else(
        pc.and_(iso, pc.invert(zoned)), pc.binary_join_element_wise(text, "Z", ""), text
    )
    us = np.zeros(n, np.int64)
    ok = iso.to_numpy(zero_copy_only=False)
    if ok.any():
        try:
            parsed = pc.cast(pc.filter(text, iso), pa.timestamp("us", tz="UTC"))
            us[ok] = parsed.cast(pa.int64()).to_numpy()
        except pa.ArrowInvalid:  # a well-shaped but impossible date: settle it value by value
            for k in np.flatnonzero(ok):
                try:
                    us[k] = pc.cast(pa.array([text[k].as_py()]), pa.timestamp("us", tz="UTC"))[
                        0
                    ].value
                except pa.ArrowInvalid:
                    ok[k] = False
    epoch = pc.fill_null(pc.match_substring_regex(text, _EPOCH_RE), False)
    epoch = epoch.to_numpy(zero_copy_only=False) & ~ok
    if epoch.any():
        secs = pc.filter(text, pa.array(epoch)).cast(pa.float64()).to_numpy()
        us[epoch] = _epoch_us(secs)
    return us, missing, ~missing & ~ok & ~epoch


def _epoch_us(secs: np.ndarray) -> np.ndarray:
    """Epoch seconds, or milliseconds when the value is too large to be seconds."""
    secs = np.where(secs > 1e11, secs / 1000.0, secs)
    return np.round(secs * 1e6).astype(np.int64)


def _event_codes(col: pa.ChunkedArray | None, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int8 code, missing, unknown) after lower-casing and mapping known aliases."""
    if col is None:
        return np.zeros(n, np.int8), np.ones(n, bool), np.zeros(n, bool)
    text = pc.utf8_lower(pc.utf8_trim_whitespace(col.cast(pa.string())))
    missing = pc.fill_null(pc.equal(text, ""), True).to_numpy(zero_copy_only=False)
    encoded = text.combine_chunks().dictionary_encode() if n else pa.array([], pa.string())
    if not n:
        return np.zeros(0, np.int8), missing, np.zeros(0, bool)
    lookup = np.array(
        [EVENT_CODE.get(EVENT_ALIASES.get(v, v), -1) for v in encoded.dictionary.to_pylist()]
        + [-1],
        dtype=np.int8,
    )
    indices = encoded.indices.fill_null(len(lookup) - 1).to_numpy(zero_copy_only=False)
    codes = lookup[indices]
    return np.maximum(codes, 0), missing, ~missing & (codes < 0)


def _validate(
    table: pa.Table, lines: np.ndarray | int, rejects: _Rejects, data: bytes, fmt: str
) -> pa.Table:
    n = table.num_rows
    cols = _canonical(table)
    users, u_missing, u_wrong, u_neg = _ids(cols["user_id"], n)
    items, i_missing, i_wrong, i_neg = _ids(cols["item_id"], n)
    codes, e_missing, e_unknown = _event_codes(cols["event_type"], n)
    us, t_missing, t_bad = _timestamps(cols["timestamp"], n)
    session = cols["session_id"]
    nested = session is not None and pa.types.is_nested(session.type)  # objects or lists
    s_wrong = np.full(n, nested)
    checks = [  # first failing check names the reject, in this order
        (u_missing, "missing_field", "user_id"),
        (i_missing, "missing_field", "item_id"),
        (e_missing, "missing_field", "event_type"),
        (t_missing, "missing_field", "timestamp"),
        (u_wrong, "wrong_type", "user_id"),
        (i_wrong, "wrong_type", "item_id"),
        (u_neg, "negative_id", "user_id"),
        (i_neg, "negative_id", "item_id"),
        (e_unknown, "unknown_event_type", "event_type"),
        (t_bad, "unparseable_timestamp", "timestamp"),
        (s_wrong, "wrong_type", "session_id"),
    ]
    bad = np.zeros(n, bool)
    for mask, _, _ in checks:
        bad |= mask
    if bad.any():
        spans = nonblank_lines(data, fmt)
        line_of = spans[0][lines:] if isinstance(lines, int) else lines
        line_start = dict(zip(spans[0].tolist(), spans[1].tolist(), strict=True))
        line_end = dict(zip(spans[0].tolist(), spans[2].tolist(), strict=True))
        taken = np.zeros(n, bool)
        for mask, reason, field in checks:
            for k in np.flatnonzero(mask & ~taken):
                value = cols[field][int(k)].as_py() if cols[field] is not None else None
                detail = _detail(reason, field, value)
                ln = int(line_of[k])
                rejects.add(ln, reason, field, detail, data[line_start[ln] : line_end[ln]])
            taken |= mask
    good = ~bad
    if session is None or nested:
        session = pa.nulls(n, pa.string())
    session = session.cast(pa.string())
    return pa.table(
        {
            "user_id": users[good],
            "item_id": items[good],
            "event_code": codes[good],
            "ts": pa.array(us[good], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "session_id": session.filter(pa.array(good)),
        },
        schema=EVENTS_SCHEMA,
    )


def _detail(reason: str, field: str, value: object) -> str:
    if reason == "missing_field":
        return f"'{field}' is missing or empty"
    if reason == "wrong_type" and field == "session_id":
        return f"'session_id' must be text or a number, got {value!r}"
    if reason == "wrong_type":
        return f"'{field}' must be an integer, got {value!r}"
    if reason == "negative_id":
        return f"'{field}' must be >= 0, got {value!r}"
    if reason == "unknown_event_type":
        return f"'{value}' is not one of view, cart, remove_from_cart, purchase (or an alias)"
    return f"cannot read a timestamp from {value!r} (ISO-8601, '... UTC' or epoch seconds)"


def parse_block(
    data: bytes,
    fmt: str,
    *,
    column_names: list[str] | None = None,
    has_header: bool = False,
    use_threads: bool = False,
) -> BlockResult:
    """Parse whole lines of one file. Line numbers in the result are 0-based within `data`."""
    rejects = _Rejects()
    data = _drop_invalid_utf8(data, rejects)
    if fmt == "jsonl":
        parts = _parse_json(data, rejects, use_threads)
    else:
        parts = _parse_csv(data, rejects, use_threads, column_names or [], has_header)
    tables = []
    for table, lines in parts:
        tables.append(_validate(table, lines, rejects, data, fmt))
    events = pa.concat_tables(tables) if tables else EVENTS_SCHEMA.empty_table()
    return BlockResult(
        events, rejects.lines, rejects.reasons, rejects.fields, rejects.details, rejects.raw
    )
