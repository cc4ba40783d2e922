"""Source layouts: where each field of an event sits in a clickstream file, as data.

A `Layout` says, per field, which column holds it (a header name, or a 0-based position written
as a number), whether there is a header, the delimiter, how event names map onto the canonical
types, and how to read the timestamp. The presets below are plain instances for the public logs
users bring; a custom layout is the same dataclass given as JSON. `auto` picks a preset from a
file's first line, and says why, so the report can tell the user what was assumed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import zoneinfo
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pcsv

from flyray.clickstream.schema import (
    EVENT_ALIASES,
    EVENT_CODE,
    EVENT_TYPES,
    FIELD_ALIASES,
    JSON_SUFFIXES,
    REQUIRED_FIELDS,
    IngestError,
)

TIME_UNITS = {"s": 1_000_000, "ms": 1_000, "us": 1}
_ZONE_OFFSET = re.compile(r"^[+-]\d{2}:\d{2}$")


@dataclass
class Layout:
    """Where an event's fields sit in a source file and how to read them (docs/layouts.md).

    Columns are header names (matched exactly, else ignoring case and `_`), or 0-based
    positions written as numbers ("3"); a headerless file's columns may be named in `columns`.
    """

    name: str = "custom"
    format: str = "csv"  # csv (with any one-character delimiter) or jsonl (keys name fields)
    header: bool = True  # csv: the first line names the columns
    delimiter: str = ","
    columns: list[str] = field(default_factory=list)  # names for a headerless file's columns
    user: str = "user_id"  # "": no user column, every event's user is its session
    item: str = "item_id"
    event: str = "event_type"  # "": no event column, every row is a view
    timestamp: str = "timestamp"
    session: str = ""  # "": no session column
    # Source event name -> view | cart | remove_from_cart | purchase, over the canonical names
    # and the built-in aliases (schema.EVENT_ALIASES); matched ignoring case and spaces.
    events: dict[str, str] = field(default_factory=dict)
    time_unit: str = "auto"  # numeric timestamps: s, ms, us; auto: ms above 1e11, else s
    time_format: str = ""  # strptime format of text times; "": ISO-8601, "... UTC" or epoch
    time_zone: str = "UTC"  # zone of times written without one: an IANA name or +HH:MM
    time_offset: str = ""  # a column added to the timestamp (DIGINETICA's timeframe)
    time_offset_unit: str = "ms"
    missing: list[str] = field(default_factory=list)  # values meaning "absent", besides ""

    def __post_init__(self) -> None:
        where = f"layout {self.name!r}"
        if self.format not in ("csv", "jsonl"):
            raise ValueError(f"{where}: format must be csv or jsonl, got {self.format!r}")
        if len(self.delimiter) != 1:
            raise ValueError(f"{where}: delimiter must be one character, got {self.delimiter!r}")
        if not self.item or not self.timestamp:
            raise ValueError(f"{where}: item and timestamp columns are required")
        if not self.user and not self.session:
            raise ValueError(f"{where}: give a user column, a session column or both")
        bad = {k: v for k, v in self.events.items() if v not in EVENT_TYPES}
        if bad:
            raise ValueError(f"{where}: events maps to unknown types {bad}; expected {EVENT_TYPES}")
        if self.time_unit not in ("auto", *TIME_UNITS):
            raise ValueError(f"{where}: time_unit must be auto, s, ms or us")
        if self.time_offset_unit not in TIME_UNITS:
            raise ValueError(f"{where}: time_offset_unit must be s, ms or us")
        if self.time_zone != "UTC" and not _ZONE_OFFSET.match(self.time_zone):
            try:
                zoneinfo.ZoneInfo(self.time_zone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{where}: unknown time_zone {self.time_zone!r}") from None

    def fields(self) -> dict[str, str]:
        """Canonical field -> the column (or JSON key) that holds it; absent ones left out."""
        named = {
            "user_id": self.user,
            "item_id": self.item,
            "event_type": self.event,
            "timestamp": self.timestamp,
            "session_id": self.session,
            "time_offset": self.time_offset,
        }
        return {f: c for f, c in named.items() if c}

    def event_lookup(self) -> dict[str, int]:
        """Normalised source event name -> event code."""
        names = {t: t for t in EVENT_TYPES} | EVENT_ALIASES | self.events
        return {_event_key(k): EVENT_CODE[v] for k, v in names.items()}


def _event_key(name: str) -> str:
    return name.strip().lower()


PRESETS: dict[str, Layout] = {
    layout.name: layout
    for layout in [
        Layout("jsonl", format="jsonl", session="session_id"),
        Layout(
            "rees46",
            user="user_id",
            item="product_id",
            event="event_type",
            timestamp="event_time",
            session="user_session",
        ),
        Layout(
            "retailrocket",
            user="visitorid",
            item="itemid",
            event="event",
            timestamp="timestamp",
            events={"view": "view", "addtocart": "cart", "transaction": "purchase"},
            time_unit="ms",
        ),
        Layout(
            "taobao",
            header=False,
            columns=["user_id", "item_id", "category_id", "behavior_type", "timestamp"],
            event="behavior_type",
            # A favourite is a stronger signal than a view and weaker than a purchase: it
            # weighs like an add-to-cart (map it to "view" in a custom layout to weigh it less).
            events={"pv": "view", "cart": "cart", "fav": "cart", "buy": "purchase"},
            time_unit="s",
        ),
        Layout(
            "diginetica",
            delimiter=";",
            user="user_id",
            event="",
            timestamp="eventdate",
            time_format="%Y-%m-%d",
            time_offset="timeframe",
            session="session_id",
            missing=["NA"],
        ),
        Layout(
            "yoochoose",
            header=False,
            columns=["session_id", "timestamp", "item_id", "category"],
            user="",
            event="",
            session="session_id",
        ),
    ]
}
# Headerless presets are told apart by the shape of their first row.
_SIGNATURES: dict[str, tuple[re.Pattern, str]] = {
    "taobao": (
        re.compile(r"\d+,\d+,\d+,(pv|cart|fav|buy),\d{9,11}"),
        "user,item,category,pv|cart|fav|buy,epoch seconds",
    ),
    "yoochoose": (
        re.compile(r"\d+,\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z,\d+,[^,]*"),
        "session,ISO time ending in Z,item,category",
    ),
}
_HEADER_PRESETS = ("rees46", "retailrocket", "diginetica")


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _split(line: str, delimiter: str) -> list[str]:
    return [c.strip().strip('"').lstrip("\ufeff") for c in line.split(delimiter)]


def layout_for(config_layout: str, custom: Layout | None) -> Layout | None:
    """The layout that the config names, or None for auto-detection."""
    if custom is not None:
        if config_layout not in ("auto", "custom"):
            raise ValueError(
                f"ingest_config: layout {config_layout!r} and a custom_layout are both given; "
                "set layout to 'custom' (or leave it 'auto') to use the custom one"
            )
        return custom
    if config_layout == "auto":
        return None
    if config_layout == "custom":
        raise ValueError("ingest_config: layout 'custom' needs custom_layout")
    if config_layout not in PRESETS:
        raise ValueError(
            f"ingest_config: unknown layout {config_layout!r}; expected auto, custom or one of "
            f"{', '.join(PRESETS)}"
        )
    return PRESETS[config_layout]


def detect(line: bytes, source: str) -> tuple[Layout, str]:
    """The layout of a file from its first nonblank line, and why."""
    text = line.decode("utf-8", "replace").lstrip("\ufeff").strip()
    shown = text if len(text) <= 100 else text[:100] + "..."
    if source.lower().endswith(JSON_SUFFIXES) or text.startswith("{"):
        return _detect_json(text)
    for name in _HEADER_PRESETS:
        preset = PRESETS[name]
        header = {_norm(c) for c in _split(text, preset.delimiter)}
        wanted = list(preset.fields().values())
        if all(_norm(c) in header for c in wanted):
            return preset, f"the header has {name}'s columns {', '.join(wanted)}"
    for name, (pattern, shape) in _SIGNATURES.items():
        if pattern.fullmatch(text):
            return PRESETS[name], f"no header; the first line {shown!r} is a {name} row ({shape})"
    for delimiter in (",", ";", "\t", "|"):
        names = _split(text, delimiter)
        found = _named(names)
        if found is not None:
            layout = Layout("named columns", delimiter=delimiter, **found)
            named = ", ".join(c for c in layout.fields().values())
            return layout, f"the header names the columns {named}"
    names = _split(text, ",")
    have = {_norm(n) for n in names}
    missing = [f for f in REQUIRED_FIELDS if not {_norm(a) for a in FIELD_ALIASES[f]} & have]
    expected = ", ".join("/".join(FIELD_ALIASES[f]) for f in REQUIRED_FIELDS)
    known = f"the header of {', '.join(_HEADER_PRESETS)} or a {' or '.join(_SIGNATURES)} row"
    raise IngestError(
        f"{source}: CSV header lacks {missing}; found columns {names[:20]}, expected {expected}. "
        f"The first line {shown!r} is not a known layout either ({known}): set "
        "ingest_config.layout to a preset or give a custom_layout (docs/layouts.md)"
    )


def _named(names: list[str]) -> dict[str, str] | None:
    """Columns named after the canonical fields (schema.FIELD_ALIASES), if all required are."""
    by_norm = {_norm(n): n for n in reversed(names)}
    found = {}
    for fld, aliases in FIELD_ALIASES.items():
        hit = next((by_norm[_norm(a)] for a in aliases if _norm(a) in by_norm), "")
        found[fld] = hit
    if not all(found[f] for f in REQUIRED_FIELDS):
        return None
    return {
        "user": found["user_id"],
        "item": found["item_id"],
        "event": found["event_type"],
        "timestamp": found["timestamp"],
        "session": found["session_id"],
    }


def _detect_json(text: str) -> tuple[Layout, str]:
    try:
        keys = json.loads(text)
    except ValueError:
        keys = None
    if not isinstance(keys, dict):  # the line is rejected later; the name says JSON lines
        return PRESETS[
            "jsonl"
        ], "JSON lines: the file name says so (the first line is not an object)"
    found = _named(list(keys))
    if found is None:  # its records lack fields: they are rejected, one by one, with reasons
        return PRESETS["jsonl"], "the first line is a JSON object"
    found["session"] = found["session"] or "session_id"
    layout = Layout("jsonl", format="jsonl", **found)
    if layout.fields() == PRESETS["jsonl"].fields():
        return PRESETS["jsonl"], "the first line is a JSON object with the canonical keys"
    named = ", ".join(layout.fields().values())
    layout.name = "jsonl (named keys)"
    return layout, f"the first line is a JSON object with the keys {named}"


def resolve(layout: Layout, first_line: bytes, source: str) -> Layout:
    """The layout with every field named by an actual column of this file, and `columns`
    listing all of them (what pyarrow's reader is told). JSON lines need no resolving."""
    if layout.format == "jsonl":
        return layout
    try:
        table = pcsv.read_csv(
            io.BytesIO(first_line + b"\n"),
            read_options=pcsv.ReadOptions(autogenerate_column_names=not layout.header),
            parse_options=pcsv.ParseOptions(delimiter=layout.delimiter),
            convert_options=pcsv.ConvertOptions(column_types={}, strings_can_be_null=False),
        )
    except pa.ArrowInvalid as exc:
        raise IngestError(f"{source}: cannot read the first line as CSV ({exc})") from None
    if layout.header:
        names = [n.strip().lstrip("\ufeff") for n in table.column_names]
    else:
        n = table.num_columns
        names = list(layout.columns[:n]) + [str(i) for i in range(len(layout.columns), n)]
    exact = {n: n for n in names}
    loose = {_norm(n): n for n in reversed(names)}
    resolved = {}
    for attr in ("user", "item", "event", "timestamp", "session", "time_offset"):
        want = getattr(layout, attr)
        if not want:
            resolved[attr] = ""
            continue
        hit = exact.get(want) or loose.get(_norm(want))
        if hit is None and want.isdigit() and int(want) < len(names):
            hit = names[int(want)]
        if hit is None:
            what = "the header has" if layout.header else "the first line has columns"
            raise IngestError(
                f"{source}: layout {layout.name!r} expects a column {want!r} for {attr}; "
                f"{what} {names[:20]} ({len(names)} in all). Choose another layout or name "
                "the column by its header name or 0-based position (docs/layouts.md)"
            )
        resolved[attr] = hit
    return dataclasses.replace(layout, columns=names, **resolved)


def first_line(data: bytes) -> bytes:
    """The first nonblank line of `data` (a header, or the first record), without its newline."""
    for line in data.split(b"\n", 64)[:64]:
        if line.strip():
            return line.rstrip(b"\r")
    return b""
