"""What the data-preparation steps report: typed task outputs and their decks."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field

from flyray import decks


@dataclass
class IngestReport:
    """What ingest read, kept and rejected; also the `data profile` seed for the feature step."""

    source: str
    files: int
    bytes: int
    blocks: int
    events: int
    rejects: int
    reject_fraction: float
    rejects_by_reason: dict[str, int]
    events_by_type: dict[str, int]
    seconds: float
    events_uri: str
    rejects_uri: str
    empty_files: list[str] = field(default_factory=list)
    layout: str = ""  # the layout(s) the files were read with (layouts.py)
    layout_reason: str = ""  # why: the config named it, or what `auto` saw in the first line
    user_key: str = "user"
    session_users: int = 0  # events whose user is their session (no user column or value)
    fingerprint: str = ""  # the source's content (flyray.storage.fingerprint), for lineage


@dataclass
class DataProfile:
    """What went in and what came out; shown as a deck and kept as profile.json."""

    events: int
    events_by_type: dict[str, int]
    rejects: int
    rejects_by_reason: dict[str, int]
    duplicates_removed: int
    truncated_events: int
    non_positive_pairs: int
    users_seen: int
    items_seen: int
    users: int
    items: int
    ratings_by_split: dict[str, int]
    users_without_holdout: int
    sparsity: float
    rating_mean: float
    first_event: str
    last_event: str
    seconds: float
    # lineage (flyray.lineage): where the events came from, their digest, the window used
    source: str = ""
    fingerprint: str = ""
    window: str = ""


def ingest_deck(report: IngestReport, fingerprint: str, first_rejects: list[dict]) -> list[str]:
    facts = {
        "source": report.source, "fingerprint": fingerprint[:16], "files": report.files,
        "layout": report.layout, "why this layout": report.layout_reason,
        "user key": report.user_key, "events with the session as user": report.session_users,
        "bytes": report.bytes, "events": report.events, "rejects": report.rejects,
        "reject fraction": report.reject_fraction, "seconds": report.seconds,
        "rejects file": report.rejects_uri,
    }  # fmt: skip
    return [
        decks.table_html(facts, "Ingest"),
        decks.bar_chart_html(report.events_by_type, "Events by type", "events", log=True),
        decks.table_html(report.rejects_by_reason, "Rejects by reason"),
        decks.table_html(first_rejects, "First rejected records"),
    ]


def profile_deck(profile: DataProfile, event_weights: dict[str, float]) -> list[str]:
    scalars = {k: v for k, v in profile.__dict__.items() if not isinstance(v, dict)}
    return [
        decks.table_html(scalars, "Profile"),
        decks.bar_chart_html(profile.ratings_by_split, "Ratings per split", "ratings"),
        decks.bar_chart_html(profile.events_by_type, "Events by type", "events", log=True),
        decks.table_html(profile.rejects_by_reason, "Rejects by reason"),
        f"<pre>{html.escape(json.dumps(event_weights))}</pre>",
    ]
