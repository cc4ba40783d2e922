"""The clickstream contract: accepted layouts, canonical event types and reject reasons."""

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

# Canonical field -> accepted source column names, in order of preference. (a) is the JSON lines
# layout of the original clickstream.json; (b) is REES46's CSV layout.
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

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
CSV_SUFFIXES = (".csv", ".csv.gz")
INPUT_SUFFIXES = JSON_SUFFIXES + CSV_SUFFIXES


def detect_format(path: str) -> str:
    """'jsonl' or 'csv' from the file name; anything else is refused with the accepted names."""
    lower = path.lower()
    if lower.endswith(JSON_SUFFIXES):
        return "jsonl"
    if lower.endswith(CSV_SUFFIXES):
        return "csv"
    raise ValueError(f"{path}: unknown input format; expected one of {', '.join(INPUT_SUFFIXES)}")
