"""Configuration of the data-preparation steps: plain dataclasses, also the Flyte task inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from flyray.clickstream.layouts import Layout, layout_for
from flyray.clickstream.schema import EVENT_TYPES


@dataclass
class IngestConfig:
    """How clickstream files are read and when bad input fails the run."""

    # Megabytes per read task: small enough to balance two cores on one 200 MB file, large
    # enough that per-task overhead stays below a few percent.
    block_mb: int = 32
    # Events are written hash-partitioned by user into this many buckets, so that every user's
    # full history sits in one bucket and feature engineering needs no shuffle.
    n_buckets: int = 16
    # Fail when more than this fraction of records is rejected (rejects are kept either way).
    max_reject_fraction: float = 0.01
    # Where each field sits in the files: "auto" (from each file's first line), a preset name
    # (layouts.PRESETS: jsonl, rees46, retailrocket, taobao, diginetica, yoochoose) or
    # "custom" with custom_layout. See docs/layouts.md.
    layout: str = "auto"
    custom_layout: Layout | None = None
    # Whose history an event belongs to: "user" (the user column; where a row has none, its
    # session stands in, counted in the report) or "session" (always the session).
    user_key: str = "user"
    # Bounds on hostile input (docs/layouts.md#limits): a longer line, or a JSON record nested
    # deeper, is rejected (counted and kept) before any parser sees it; a compressed file that
    # expands past max_expanded_gb fails the run naming it (a decompression bomb).
    max_line_kb: int = 1024
    max_depth: int = 32
    max_expanded_gb: float = 16.0

    def __post_init__(self) -> None:
        layout_for(self.layout, self.custom_layout)  # an unknown or conflicting layout fails here
        if self.user_key not in ("user", "session"):
            raise ValueError(f"user_key must be 'user' or 'session', got {self.user_key!r}")
        if self.max_line_kb < 1 or self.max_depth < 2 or self.max_expanded_gb <= 0:
            raise ValueError(
                "max_line_kb must be >= 1, max_depth >= 2 and max_expanded_gb > 0, got "
                f"{self.max_line_kb}, {self.max_depth}, {self.max_expanded_gb}"
            )


def default_event_weights() -> dict[str, float]:
    """Implicit-feedback weights; why these values: docs/recommendation.md, "From events to
    ratings"."""
    return {"view": 1.0, "cart": 4.0, "remove_from_cart": -3.0, "purchase": 10.0}


@dataclass
class FeatureConfig:
    """How events become ratings, which users and items are kept, and how splits are cut."""

    event_weights: dict[str, float] = field(default_factory=default_event_weights)
    # rating = rating_min + (rating_max - rating_min) * (1 - exp(-weight / saturation))
    saturation: float = 5.0
    rating_min: float = 1.0
    rating_max: float = 5.0
    # Distinct users an item needs, then distinct (kept) items a user needs.
    min_item_interactions: int = 2
    min_user_interactions: int = 3
    # Per user, the latest fractions of their items (by first interaction) are held out.
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    # Data window: only events in [window_end - window_days, window_end) are used. Empty
    # window_end or window_days 0: all events. A scheduled run sets window_end to its kickoff.
    window_end: str = ""
    window_days: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.event_weights) - set(EVENT_TYPES)
        if unknown:
            raise ValueError(
                f"event_weights: unknown event types {sorted(unknown)}; expected {EVENT_TYPES}"
            )
        if not 0 <= self.validation_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("validation_fraction and test_fraction must be in [0, 1)")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must leave data to train on")
        if self.saturation <= 0 or self.rating_max <= self.rating_min:
            raise ValueError("saturation must be > 0 and rating_max > rating_min")
        if self.min_item_interactions < 1 or self.min_user_interactions < 1:
            raise ValueError("minimum interaction counts must be >= 1")
        if self.window_days < 0:
            raise ValueError("window_days must be >= 0")
        self.window()  # a bad window_end fails here, not inside a Ray task

    def window(self) -> tuple[datetime, datetime] | None:
        """[start, end) of the data window in UTC, or None for all data."""
        if not self.window_end or not self.window_days:
            return None
        end = datetime.fromisoformat(self.window_end)
        end = end if end.tzinfo else end.replace(tzinfo=UTC)
        return end - timedelta(days=self.window_days), end

    def weight_vector(self) -> np.ndarray:
        """Weights indexed by event code (missing types weigh 0)."""
        return np.array([self.event_weights.get(t, 0.0) for t in EVENT_TYPES], dtype=np.float64)
