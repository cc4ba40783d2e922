"""The clickstream contract: canonical event types and fields, reject reasons, file names.

Where these fields sit in a source file is a Layout (layouts.py)."""

from __future__ import annotations

import pyarrow as pa

# Canonical event types, stored as int8 codes (small on disk, a numpy lookup for weights).
EVENT_TYPES: tuple[str, ...] = ("view", "cart", "remove_from_cart", "purchase")
EVENT_CODE: dict[str, int] = {name: code for code, name in enumerate(EVENT_TYPES)}
# Spellings seen in other clickstream exports, mapped onto the canonical types.
EVENT_ALIASES: dict[str, str] = {
    "click": "view",
    "page_view": "view",
    "add_to_cart": "cart",
    "addtocart": "cart",
    "remove": "remove_from_cart",
    "removefromcart": "remove_from_cart",
    "transaction": "purchase",
    "buy": "purchase",
}

# Canonical field -> source column names that `auto` accepts for it in a header or in the first
# JSON record, in order of preference: the JSON lines keys, then REES46's names.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "user_id": ("user_id",),
    "item_id": ("item_id", "product_id"),
    "event_type": ("event_type",),
    "timestamp": ("timestamp", "event_time"),
    "session_id": ("session_id", "user_session"),
}
REQUIRED_FIELDS: tuple[str, ...] = ("user_id", "item_id", "event_type", "timestamp")
ID_FIELDS: tuple[str, ...] = ("user_id", "item_id")

REJECT_REASONS: tuple[str, ...] = (
    "malformed_line",
    "missing_field",
    "wrong_type",
    "unknown_event_type",
    "negative_id",
    "unparseable_timestamp",
    "line_too_long",  # over IngestConfig.max_line_kb: never handed to a parser
    "nested_too_deep",  # JSON nested past IngestConfig.max_depth: never handed to a parser
)

EVENTS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("event_code", pa.int8()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("session_id", pa.string()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("line", pa.int64()),  # 1-based line number in the source file
        ("reason", pa.string()),
        ("field", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
    ]
)

# Compressed inputs by suffix: pyarrow's codec, streamed (never expanded whole in memory).
COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
JSON_SUFFIXES = tuple(s + c for s in (".jsonl", ".json", ".ndjson") for c in ("", *COMPRESSION))
# .dat: YooChoose's yoochoose-clicks.dat; .tsv: tab-separated exports.
CSV_SUFFIXES = tuple(s + c for s in (".csv", ".dat", ".tsv") for c in ("", *COMPRESSION))
INPUT_SUFFIXES = JSON_SUFFIXES + CSV_SUFFIXES


class IngestError(ValueError):
    """Input that cannot be ingested: the message names the file, the counts and what to do."""
