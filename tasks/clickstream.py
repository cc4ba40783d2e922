"""Flyte tasks for the first steps of the recommendation job: source, ingest, features."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from datetime import UTC, datetime, timedelta
from typing import Annotated, NamedTuple

from flytekit import StructuredDataset, kwtypes
from flytekit.core.context_manager import FlyteContextManager
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

import images
from flyray import storage
from flyray.clickstream.config import FeatureConfig, IngestConfig
from flyray.clickstream.features import build_features
from flyray.clickstream.generate import GeneratorConfig, generate
from flyray.clickstream.ingest import ingest
from flyray.clickstream.reports import DataProfile, IngestReport, ingest_deck, profile_deck
from flyray.clickstream.schema import INPUT_SUFFIXES
from tasks.outputs import new_output_dir, publish, uri
from tasks.platform import flyray_task, minutes

Ratings = Annotated[
    StructuredDataset,
    kwtypes(user_idx=int, item_idx=int, rating=float, weight=float, n_events=int),
]


class SourceOutputs(NamedTuple):
    source: str
    fingerprint: str


class IngestOutputs(NamedTuple):
    events: FlyteDirectory
    rejects: FlyteFile
    report: IngestReport


class FeatureOutputs(NamedTuple):
    train: Ratings
    validation: Ratings
    test: Ratings
    id_maps: FlyteDirectory
    profile: DataProfile


@flyray_task(images.recommender, timeout=minutes(30))
def resolve_source(
    source: str, demo_events: int, demo_seed: int, run_date: datetime | None
) -> SourceOutputs:
    """Name the input and fingerprint its content (never cached: the content may change).

    `{date:...}` in `source` is filled from `run_date` (a schedule's kickoff time), e.g.
    s3://clicks/{date:%Y/%m}/. An empty `source` generates the deterministic demo clickstream,
    covering the 30 days before `run_date` when one is given.
    """
    if "{date" in source:
        if run_date is None:
            raise ValueError(f"source {source!r} is a template: give run_date")
        source = source.format(date=run_date)
    if not source:
        ctx = FlyteContextManager.current_context()
        demo = GeneratorConfig(n_events=demo_events, seed=demo_seed)
        if run_date is not None:
            start = run_date.replace(tzinfo=None) - timedelta(days=demo.days)
            demo.start = start.isoformat(timespec="seconds")
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, f"demo-{demo_events}-{demo_seed}.jsonl")
            generate(local, demo)
            source = ctx.file_access.put_data(local, ctx.file_access.get_random_remote_path(local))
    return SourceOutputs(
        source, storage.fingerprint(storage.list_input_files(source, INPUT_SUFFIXES))
    )


@flyray_task(images.recommender, storage=False, timeout=minutes(5))
def data_window(
    config: FeatureConfig, run_date: datetime | None, window_days: int
) -> FeatureConfig:
    """The feature config restricted to the window_days before run_date (unchanged if either is
    unset), so a scheduled run trains on the data its kickoff time selects."""
    if run_date is None or window_days <= 0:
        return config
    end = run_date if run_date.tzinfo else run_date.replace(tzinfo=UTC)
    return dataclasses.replace(config, window_end=end.isoformat(), window_days=window_days)


@flyray_task(
    images.recommender, ray=True, cache="ingest-2", cache_ignore=("source",), deck=True,
    timeout=minutes(120),
)  # fmt: skip
def ingest_clickstream(source: str, fingerprint: str, config: IngestConfig) -> IngestOutputs:
    """Validate and bucket the events on Ray; the cache key is the content fingerprint."""
    report = dataclasses.replace(ingest(source, new_output_dir(), config), fingerprint=fingerprint)
    first_rejects = storage.read_table(report.rejects_uri).slice(0, 20).to_pylist()
    publish("ingest", *ingest_deck(report, fingerprint, first_rejects))
    return IngestOutputs(
        FlyteDirectory(report.events_uri, remote_directory=False),
        FlyteFile(report.rejects_uri, remote_path=False),
        report,
    )


@flyray_task(images.recommender, ray=True, cache="features-2", deck=True, timeout=minutes(60))
def build_ratings(
    events: FlyteDirectory, report: IngestReport, config: FeatureConfig
) -> FeatureOutputs:
    """Implicit ratings, dense id maps and a per-user time split, one Ray task per bucket."""
    out = new_output_dir()
    profile = build_features(uri(events), out, config, report)
    publish("data profile", *profile_deck(profile, config.event_weights))
    splits = (StructuredDataset(uri=storage.join(out, n)) for n in ("train", "validation", "test"))
    id_maps = FlyteDirectory(storage.join(out, "id_maps"), remote_directory=False)
    return FeatureOutputs(*splits, id_maps, profile)
