"""What the data-preparation steps report: typed task outputs, decks and JSON files."""

from __future__ import annotations

from dataclasses import dataclass, field


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
