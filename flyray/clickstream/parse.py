"""Parse and validate one block of clickstream bytes into typed events and counted rejects.

A block is a run of whole lines from one file, read as its Layout says (layouts.py): one path
for every layout. The fast path hands the block to pyarrow's C++ JSON/CSV readers (ids as
int64, events dictionary-encoded, epochs and formatted times converted by the reader) and
validates with vectorised compute. Only when pyarrow refuses a block does it fall back: CSV
re-reads the block as text and explains each bad value; JSON bisects to the offending lines and
explains each in Python. Bad records cost time in proportion to how many there are, and good
ones are never dropped with them.
"""

from __future__ import annotations

import codecs
import io
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson

from flyray.bounds import json_depth
from flyray.clickstream.layouts import PRESETS, TIME_UNITS, Layout, first_line, resolve
from flyray.clickstream.schema import EVENTS_SCHEMA

_INT64_MAX = 2**63 - 1
_ISO_RE = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:?\d{2})?$"
_EPOCH_RE = r"^\d{9,13}(\.\d+)?$"  # auto: an epoch in seconds or milliseconds
_NUMBER_RE = r"^\d+(\.\d+)?$"  # an epoch in the layout's time_unit
_ZONED_RE = r"(Z|[+-]\d{2}:?\d{2})$"
# Users made from sessions (layouts without a user, anonymous sessions) get ids from here up,
# apart from the real user ids of the same file.
SESSION_USER_BASE = 1 << 62
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
    session_users: int = 0  # events kept whose user is their session

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


@dataclass(frozen=True)
class Limits:
    """Bounds on one record, checked before any parser sees it (IngestConfig sets them)."""

    max_line_bytes: int = 1 << 20
    max_depth: int = 32  # JSON objects and arrays inside each other


_OPEN = np.frombuffer(b"{[", dtype=np.uint8)


def _long_lines(data: bytes, limit: int) -> list[tuple[int, int]]:
    """(start, end) of every line longer than `limit`, found without per-byte arrays: such a
    line spans a whole aligned window of limit/2 bytes, so only windows with no newline (found
    by bytes.find) are followed to their line's ends."""
    found: list[tuple[int, int]] = []
    step = max(1, limit // 2)
    for window in range(0, len(data), step):
        if found and window < found[-1][1]:
            continue  # inside a line already found
        if data.find(b"\n", window, window + step) >= 0 or window + step > len(data):
            continue
        start = data.rfind(b"\n", 0, window) + 1
        end = data.find(b"\n", window)
        end = len(data) if end < 0 else end
        if end - start > limit:
            found.append((start, end))
    return found


def _deep_lines(data: bytes, limits: Limits) -> list[tuple[int, int, int]]:
    """(start, end, depth) of the JSON lines nested deeper than the limit. Lines are counted in
    slices of about a megabyte, so memory stays small whatever the block holds (a flood of
    blank lines would otherwise cost 8 bytes a line per array); only lines with more opening
    brackets than the limit are scanned."""
    found = []
    if data.count(b"[") + data.count(b"{") <= limits.max_depth:
        return found
    begin = 0
    while begin < len(data):
        cut = data.find(b"\n", min(begin + (1 << 20), len(data)))
        stop = len(data) if cut < 0 else cut + 1
        buf = np.frombuffer(data, dtype=np.uint8, count=stop - begin, offset=begin)
        nl = np.flatnonzero(buf == 10)
        starts = np.concatenate(([0], nl + 1))
        ends = np.concatenate((nl, [len(buf)]))
        opened = np.concatenate(([0], np.cumsum(np.isin(buf, _OPEN), dtype=np.int32)))
        for k in np.flatnonzero(opened[ends] - opened[starts] > limits.max_depth).tolist():
            start, end = begin + int(starts[k]), begin + int(ends[k])
            depth = json_depth(data[start:end])
            if depth > limits.max_depth:
                found.append((start, end, depth))
        begin = stop
    return found


def _screen(data: bytes, rejects: _Rejects, limits: Limits, fmt: str) -> bytes:
    """Reject and empty the lines over `limits` (line numbers stay as they were): what pyarrow
    and the per-line explanations never see."""
    bad = {
        start: (end, "line_too_long", f"{end - start:,} bytes, over the limit of "
                f"{limits.max_line_bytes:,}")
        for start, end in _long_lines(data, limits.max_line_bytes)
    }  # fmt: skip
    if fmt == "jsonl":  # long lines emptied first: they are not scanned for depth
        cuts, removed = [], 0  # (where a long line was emptied in `kept`, bytes removed so far)
        for start in sorted(bad):
            removed += bad[start][0] - start
            cuts.append((start - removed + bad[start][0] - start, removed))
        for start, end, depth in _deep_lines(_blank(data, bad) if bad else data, limits):
            shift = max((r for at, r in cuts if at <= start), default=0)
            detail = f"nested {depth:,} deep, over the limit of {limits.max_depth}"
            bad[start + shift] = (end + shift, "nested_too_deep", detail)
    if not bad:
        return data
    line, counted = 0, 0
    for start in sorted(bad):
        end, reason, detail = bad[start]
        line += data.count(b"\n", counted, start)
        counted = start
        rejects.add(line, reason, None, detail, data[start : start + 4 * _RAW_KEEP])
    return _blank(data, bad)


def _blank(data: bytes, lines: dict[int, tuple]) -> bytes:
    """`data` with the lines starting at the keys of `lines` (ending at their values' first
    item) emptied."""
    parts, done = [], 0
    for start in sorted(lines):
        parts.append(data[done:start])
        done = lines[start][0]
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


def _explain_json_line(text: bytes, layout: Layout) -> tuple[str, str | None, str] | None:
    """Why pyarrow refused this line, or None when the line is valid on its own. Missing
    values are not pyarrow's concern: validation names them (a session may stand in)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # the screen keeps deep lines out; belt and braces
        return "malformed_line", None, f"invalid JSON: {exc}"
    if not isinstance(obj, dict):
        return "malformed_line", None, f"expected a JSON object, got {type(obj).__name__}"
    for field, key in (("user_id", layout.user), ("item_id", layout.item)):
        value = obj.get(key) if key else None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > _INT64_MAX:
            return (
                "wrong_type",
                field,
                f"{_label(layout, field)} must be a 64-bit integer, got {value!r}",
            )
    event = obj.get(layout.event) if layout.event else None
    if event is not None and not isinstance(event, str):
        return (
            "wrong_type",
            "event_type",
            f"{_label(layout, 'event_type')} must be a string, got {event!r}",
        )
    ts = obj.get(layout.timestamp)
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (str, int, float))):
        return "unparseable_timestamp", "timestamp", f"cannot read a timestamp from {ts!r}"
    session = obj.get(layout.session) if layout.session else None
    if isinstance(session, (dict, list)):
        label = _label(layout, "session_id")
        return "wrong_type", "session_id", f"{label} must be text or a number, got {session!r}"
    return None


def _json_schema(layout: Layout) -> pa.Schema:
    typed = {layout.event: pa.string(), layout.user: pa.int64(), layout.item: pa.int64()}
    return pa.schema([(key, kind) for key, kind in typed.items() if key])


def _read_json(data: bytes, layout: Layout, use_threads: bool = False) -> pa.Table:
    block = {} if use_threads else {"block_size": max(1 << 20, len(data) + 1)}
    return pjson.read_json(
        io.BytesIO(data),
        read_options=pjson.ReadOptions(use_threads=use_threads, **block),
        parse_options=pjson.ParseOptions(
            explicit_schema=_json_schema(layout), unexpected_field_behavior="infer"
        ),
    )


def _parse_json(
    data: bytes, rejects: _Rejects, use_threads: bool, layout: Layout
) -> list[tuple[pa.Table, np.ndarray | int]]:
    """Tables with the line indices they came from (an int k: the nonblank lines from the k-th)."""
    try:
        return [(_read_json(data, layout, use_threads), 0)]
    except pa.ArrowInvalid:
        pass
    idx, starts, ends = nonblank_lines(data, "jsonl")
    lines = [data[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
    out: list[tuple[pa.Table, np.ndarray | int]] = []

    def bisect(lo: int, hi: int) -> None:
        if hi - lo > _SMALL:
            try:
                out.append((_read_json(b"\n".join(lines[lo:hi]), layout), idx[lo:hi]))
                return
            except pa.ArrowInvalid:
                mid = (lo + hi) // 2
                bisect(lo, mid)
                bisect(mid, hi)
                return
        for k in range(lo, hi):
            why = _explain_json_line(lines[k], layout)
            if why is None:
                try:
                    out.append((_read_json(lines[k], layout), idx[k : k + 1]))
                    continue
                except pa.ArrowInvalid as exc:
                    why = ("malformed_line", None, str(exc))
            rejects.add(idx[k], *why, lines[k])

    bisect(0, len(lines))
    return out


# ------------------------------------------------------------------------------------------ CSV


def _read_csv(
    data: bytes, layout: Layout, has_header: bool, use_threads: bool, typed: bool, on_invalid
) -> pa.Table:
    """The layout's columns; typed: converted by the reader (fails on any bad value), else text."""
    used = list(dict.fromkeys(layout.fields().values()))
    types = {name: pa.string() for name in used}
    parsers = []
    if typed:
        for name in (layout.user, layout.item, layout.time_offset):
            if name:
                types[name] = pa.int64()
        if layout.event:
            types[layout.event] = pa.dictionary(pa.int32(), pa.string())
        if layout.time_format:
            types[layout.timestamp] = pa.timestamp("us")
            parsers = [layout.time_format]
        elif layout.time_unit in TIME_UNITS:
            types[layout.timestamp] = pa.int64()
    return pcsv.read_csv(
        io.BytesIO(data),
        read_options=pcsv.ReadOptions(
            column_names=layout.columns, skip_rows=1 if has_header else 0, use_threads=use_threads
        ),
        parse_options=pcsv.ParseOptions(delimiter=layout.delimiter, invalid_row_handler=on_invalid),
        convert_options=pcsv.ConvertOptions(
            column_types=types,
            include_columns=used,
            null_values=["", *layout.missing],
            strings_can_be_null=True,
            timestamp_parsers=parsers or None,
        ),
    )


def _parse_csv(
    data: bytes, rejects: _Rejects, use_threads: bool, layout: Layout, has_header: bool
) -> list[tuple[pa.Table, np.ndarray | int]]:
    invalid: list[tuple[int | None, str]] = []

    def on_invalid(row) -> str:  # wrong number of columns: keep it, never drop it silently
        invalid.append((row.number, row.text))
        return "skip"

    try:
        table = _read_csv(data, layout, has_header, use_threads, True, on_invalid)
    except pa.ArrowInvalid:  # a value the reader cannot convert: read text, explain each one
        invalid.clear()
        table = _read_csv(data, layout, has_header, use_threads, False, on_invalid)
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
        detail = f"expected {len(layout.columns)} columns separated by {layout.delimiter!r}"
        rejects.add(idx[k], "malformed_line", None, detail, text)
    return [(table, idx[~taken])]


# ----------------------------------------------------------------------------------- validation


def _ids(
    col: pa.ChunkedArray | None, n: int, missing_values: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(values, missing, wrong_type, negative) for an id column given as int64 or as text."""
    if col is None or pa.types.is_null(col.type):
        return np.zeros(n, np.int64), np.ones(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    if pa.types.is_integer(col.type):
        missing = col.is_null().to_numpy(zero_copy_only=False)
        values = col.fill_null(0).cast(pa.int64()).to_numpy()
        return values, missing, np.zeros(n, bool), values < 0
    text = pc.utf8_trim_whitespace(col.cast(pa.string()))
    absent = pc.or_(pc.equal(text, ""), pc.is_in(text, pa.array(missing_values, pa.string())))
    missing = pc.fill_null(absent, True).to_numpy(zero_copy_only=False)
    is_int = pc.fill_null(pc.match_substring_regex(text, r"^-?\d{1,18}$"), False)
    is_int = is_int.to_numpy(zero_copy_only=False)
    values = pc.if_else(is_int, text, "0").cast(pa.int64()).to_numpy()
    wrong = ~missing & ~is_int
    return values, missing, wrong, values < 0


def _in_zone(naive_us: np.ndarray, zone: str) -> np.ndarray:
    """Wall-clock microseconds in `zone` -> UTC microseconds."""
    if zone == "UTC" or not len(naive_us):
        return naive_us
    local = pa.array(naive_us, pa.timestamp("us"))
    utc = pc.assume_timezone(local, timezone=zone, ambiguous="earliest", nonexistent="earliest")
    return utc.cast(pa.int64()).to_numpy()


def _cast_text(text: pa.Array, zoned: bool) -> tuple[np.ndarray, np.ndarray]:
    """(microseconds, ok) of ISO-8601 strings: zoned ones in UTC, others as wall-clock time."""
    kind = pa.timestamp("us", tz="UTC") if zoned else pa.timestamp("us")
    try:
        return text.cast(kind).cast(pa.int64()).to_numpy(), np.ones(len(text), bool)
    except pa.ArrowInvalid:  # a well-shaped but impossible date: settle it value by value
        us, ok = np.zeros(len(text), np.int64), np.ones(len(text), bool)
        for k in range(len(text)):
            try:
                us[k] = text[k : k + 1].cast(kind).cast(pa.int64())[0].as_py()
            except pa.ArrowInvalid:
                ok[k] = False
        return us, ok


def _timestamps(
    col: pa.ChunkedArray | None, n: int, layout: Layout
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epoch microseconds, missing, unparseable) as the layout's time_* settings say."""
    if col is None or pa.types.is_null(col.type):
        return np.zeros(n, np.int64), np.ones(n, bool), np.zeros(n, bool)
    missing = col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_timestamp(col.type):
        us = col.cast(pa.timestamp("us", tz=col.type.tz)).cast(pa.int64()).fill_null(0).to_numpy()
        return (us if col.type.tz else _in_zone(us, layout.time_zone)), missing, np.zeros(n, bool)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return _epoch_us(col.fill_null(0).to_numpy(), layout.time_unit), missing, np.zeros(n, bool)
    text = pc.utf8_trim_whitespace(col.cast(pa.string())).combine_chunks()
    absent = pc.or_(pc.equal(text, ""), pc.is_in(text, pa.array(layout.missing, pa.string())))
    missing |= pc.fill_null(absent, False).to_numpy(zero_copy_only=False)
    us = np.zeros(n, np.int64)
    if layout.time_format:
        parsed = pc.strptime(text, format=layout.time_format, unit="us", error_is_null=True)
        ok = parsed.is_valid().to_numpy(zero_copy_only=False)
        us = parsed.cast(pa.int64()).fill_null(0).to_numpy().copy()
        if parsed.type.tz is None:
            us[ok] = _in_zone(us[ok], layout.time_zone)
        return us, missing, ~missing & ~ok
    if pc.any(pc.ends_with(text, "UTC")).as_py():  # REES46's "2019-10-01 00:00:00 UTC"
        text = pc.replace_substring_regex(text, r" ?UTC$", "Z")
    try:  # every value ISO-8601 with a zone: one cast, no pattern matching
        us = text.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        return us.fill_null(0).to_numpy(), missing, np.zeros(n, bool)
    except pa.ArrowInvalid:
        pass
    iso = pc.fill_null(pc.match_substring_regex(text, _ISO_RE), False).to_numpy(
        zero_copy_only=False
    )
    zoned = pc.fill_null(pc.match_substring_regex(text, _ZONED_RE), False)
    zoned = zoned.to_numpy(zero_copy_only=False)
    ok = np.zeros(n, bool)
    for mask, with_zone in ((iso & zoned, True), (iso & ~zoned, False)):
        if mask.any():
            values, good = _cast_text(text.filter(pa.array(mask)), with_zone)
            us[mask] = values if with_zone else _in_zone(values, layout.time_zone)
            ok[mask] = good
    pattern = _EPOCH_RE if layout.time_unit == "auto" else _NUMBER_RE
    epoch = pc.fill_null(pc.match_substring_regex(text, pattern), False)
    epoch = epoch.to_numpy(zero_copy_only=False) & ~iso
    if epoch.any():
        numbers = text.filter(pa.array(epoch)).cast(pa.float64()).to_numpy()
        us[epoch] = _epoch_us(numbers, layout.time_unit)
        ok |= epoch
    return us, missing, ~missing & ~ok


def _epoch_us(values: np.ndarray, unit: str) -> np.ndarray:
    """Epoch numbers in `unit`; auto: milliseconds when too large to be seconds, else seconds."""
    if unit != "auto":
        if values.dtype.kind in "iu":
            return values.astype(np.int64) * TIME_UNITS[unit]
        return np.round(values * TIME_UNITS[unit]).astype(np.int64)
    secs = np.where(values > 1e11, values / 1000.0, values)
    return np.round(secs * 1e6).astype(np.int64)


def _event_codes(
    col: pa.ChunkedArray | None, n: int, layout: Layout
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int8 code, missing, unknown) through the layout's event map; names are looked up once
    per distinct value (a dictionary), not once per row."""
    if not layout.event:  # every row is a view
        return np.zeros(n, np.int8), np.zeros(n, bool), np.zeros(n, bool)
    if col is None or pa.types.is_null(col.type):
        return np.zeros(n, np.int8), np.ones(n, bool), np.zeros(n, bool)
    lookup = layout.event_lookup()
    absent = {"", *(v.strip().lower() for v in layout.missing)}
    codes = np.empty(n, np.int16)
    pos = 0
    for chunk in col.chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = chunk.cast(pa.string()).dictionary_encode()
        names = [str(v).strip().lower() for v in chunk.dictionary.to_pylist()]
        table = np.array([-2 if v in absent else lookup.get(v, -1) for v in names] + [-2], np.int16)
        indices = chunk.indices.fill_null(len(names)).to_numpy(zero_copy_only=False)
        codes[pos : pos + len(chunk)] = table[indices]
        pos += len(chunk)
    return np.maximum(codes, 0).astype(np.int8), codes == -2, codes == -1


def session_user_ids(sessions: pa.Array) -> np.ndarray:
    """User ids for sessions that stand in for users: SESSION_USER_BASE + the session number,
    or + a 62-bit hash of a session id that is not a number (pandas' fixed-key SipHash, the
    same on every worker and run)."""
    try:  # the common case, numbered sessions: one cast, no pattern matching
        numbers = sessions.cast(pa.int64()).to_numpy()
        if len(numbers) and numbers.min() >= 0 and numbers.max() < 10**18:
            return numbers + SESSION_USER_BASE
    except pa.ArrowInvalid:
        pass
    is_number = pc.fill_null(pc.match_substring_regex(sessions, r"^\d{1,18}$"), False)
    ids = pc.if_else(is_number, sessions, "0").cast(pa.int64()).to_numpy() + SESSION_USER_BASE
    others = ~is_number.to_numpy(zero_copy_only=False)
    if others.any():
        text = np.asarray(sessions.filter(pa.array(others)).to_pylist(), dtype=object)
        hashed = pd.util.hash_array(text) & np.uint64((1 << 62) - 1)
        ids[others] = SESSION_USER_BASE + hashed.astype(np.int64)
    return ids


def _label(layout: Layout, field: str) -> str:
    """How messages name a field: its source column, and the canonical name when they differ."""
    column = layout.fields().get(field, field)
    return f"'{field}'" if column == field else f"'{column}' ({field})"


def _validate(
    table: pa.Table,
    lines: np.ndarray | int,
    rejects: _Rejects,
    data: bytes,
    layout: Layout,
    user_key: str,
) -> tuple[pa.Table, int]:
    n = table.num_rows
    cols = {
        field: table[name] if name in table.column_names else None
        for field, name in layout.fields().items()
    }
    by_session = user_key == "session" or not layout.user
    if by_session:
        users, u_missing = np.zeros(n, np.int64), np.ones(n, bool)
        u_wrong, u_neg = np.zeros(n, bool), np.zeros(n, bool)
    else:
        users, u_missing, u_wrong, u_neg = _ids(cols.get("user_id"), n, layout.missing)
    items, i_missing, i_wrong, i_neg = _ids(cols.get("item_id"), n, layout.missing)
    codes, e_missing, e_unknown = _event_codes(cols.get("event_type"), n, layout)
    us, t_missing, t_bad = _timestamps(cols.get("timestamp"), n, layout)
    o_missing = o_bad = np.zeros(n, bool)
    if layout.time_offset:
        offset, o_missing, o_wrong, o_neg = _ids(cols.get("time_offset"), n, layout.missing)
        us = us + offset * TIME_UNITS[layout.time_offset_unit]
        o_bad = o_wrong | o_neg
    session = cols.get("session_id")
    nested = session is not None and pa.types.is_nested(session.type)  # objects or lists
    if session is None or nested:
        session = pa.chunked_array([pa.nulls(n, pa.string())])
    session = session.cast(pa.string())
    s_text = pc.utf8_trim_whitespace(session).combine_chunks()
    s_absent = pc.or_(pc.equal(s_text, ""), pc.is_in(s_text, pa.array(layout.missing, pa.string())))
    s_present = ~pc.fill_null(s_absent, True).to_numpy(zero_copy_only=False)
    fallback = u_missing & s_present  # the session stands in for the user
    if fallback.any():
        users = users.copy()  # a view of the arrow buffer is read-only
        users[fallback] = session_user_ids(s_text.filter(pa.array(fallback)))
        u_missing = u_missing & ~fallback
    checks = [  # first failing check names the reject, in this order
        (u_missing, "missing_field", "session_id" if by_session else "user_id"),
        (i_missing, "missing_field", "item_id"),
        (e_missing, "missing_field", "event_type"),
        (t_missing, "missing_field", "timestamp"),
        (o_missing, "missing_field", "time_offset"),
        (u_wrong, "wrong_type", "user_id"),
        (i_wrong, "wrong_type", "item_id"),
        (u_neg, "negative_id", "user_id"),
        (i_neg, "negative_id", "item_id"),
        (e_unknown, "unknown_event_type", "event_type"),
        (t_bad, "unparseable_timestamp", "timestamp"),
        (o_bad, "unparseable_timestamp", "time_offset"),
        (np.full(n, nested), "wrong_type", "session_id"),
    ]
    bad = np.zeros(n, bool)
    for mask, _, _ in checks:
        bad |= mask
    if bad.any():
        spans = nonblank_lines(data, layout.format)
        line_of = spans[0][lines:] if isinstance(lines, int) else lines
        line_start = dict(zip(spans[0].tolist(), spans[1].tolist(), strict=True))
        line_end = dict(zip(spans[0].tolist(), spans[2].tolist(), strict=True))
        taken = np.zeros(n, bool)
        for mask, reason, field in checks:
            for k in np.flatnonzero(mask & ~taken):
                value = cols[field][int(k)].as_py() if cols.get(field) is not None else None
                detail = _detail(reason, field, value, layout, by_session)
                ln = int(line_of[k])
                rejects.add(ln, reason, field, detail, data[line_start[ln] : line_end[ln]])
            taken |= mask
    good = ~bad
    events = pa.table(
        {
            "user_id": users[good],
            "item_id": items[good],
            "event_code": codes[good],
            "ts": pa.array(us[good], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "session_id": session.filter(pa.array(good)),
        },
        schema=EVENTS_SCHEMA,
    )
    return events, int((fallback & good).sum())


def _detail(reason: str, field: str, value: object, layout: Layout, by_session: bool) -> str:
    label = _label(layout, field)
    if reason == "missing_field" and field == "user_id" and layout.session:
        return f"{label} is missing or empty, and so is {_label(layout, 'session_id')}"
    if reason == "missing_field":
        return f"{label} is missing or empty"
    if reason == "wrong_type" and field == "session_id":
        return f"{label} must be text or a number, got {value!r}"
    if reason == "wrong_type":
        return f"{label} must be an integer, got {value!r}"
    if reason == "negative_id":
        return f"{label} must be >= 0, got {value!r}"
    if reason == "unknown_event_type":
        return (
            f"{label} {value!r} is not one of view, cart, remove_from_cart, purchase, an alias "
            "or a name in the layout's events map"
        )
    if field == "time_offset":
        return f"{label} must be a whole number of {layout.time_offset_unit} >= 0, got {value!r}"
    if layout.time_format:
        expected = f"format {layout.time_format!r}"
    elif layout.time_unit != "auto":
        expected = f"ISO-8601 or epoch {layout.time_unit}"
    else:
        expected = "ISO-8601, '... UTC' or epoch seconds"
    return f"cannot read a timestamp from {value!r} ({expected})"


def parse_block(
    data: bytes,
    layout: Layout | str,
    *,
    has_header: bool | None = None,
    use_threads: bool = False,
    user_key: str = "user",
    limits: Limits = Limits(),
) -> BlockResult:
    """Parse whole lines of one file. Line numbers in the result are 0-based within `data`.

    `layout` is resolved (layouts.resolve), or a preset name, then resolved here against the
    block's first line (the block being a whole file). `has_header`: the block starts with the
    header line (default: whether the layout has one).
    """
    rejects = _Rejects()
    data = _drop_invalid_utf8(data, rejects)
    if isinstance(layout, str):
        layout = resolve(PRESETS[layout], first_line(data), "<block>")
    data = _screen(data, rejects, limits, layout.format)
    if has_header is None:
        has_header = layout.format == "csv" and layout.header
    if layout.format == "jsonl":
        parts = _parse_json(data, rejects, use_threads, layout)
    else:
        parts = _parse_csv(data, rejects, use_threads, layout, has_header)
    tables, session_users = [], 0
    for table, lines in parts:
        events, fallback = _validate(table, lines, rejects, data, layout, user_key)
        tables.append(events)
        session_users += fallback
    events = pa.concat_tables(tables) if tables else EVENTS_SCHEMA.empty_table()
    return BlockResult(
        events,
        rejects.lines,
        rejects.reasons,
        rejects.fields,
        rejects.details,
        rejects.raw,
        session_users,
    )
