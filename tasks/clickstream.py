"""Flyte tasks for the first steps of the recommendation job: source, ingest, features."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from datetime import UTC, datetime, timedelta
from typing import Annotated, NamedTuple

import pyarrow.parquet as pq
from flytekit import Cache, StructuredDataset, kwtypes, task
from flytekit.core.context_manager import FlyteContextManager
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

import images
from flyray import storage
from flyray.clickstream.config import FeatureConfig, IngestConfig
from flyray.clickstream.features import build_features
from flyray.clickstream.generate import GeneratorConfig, generate
from flyray.clickstream.ingest import ingest
from flyray.clickstream.reports import DataProfile, IngestReport
from flyray.clickstream.schema import INPUT_SUFFIXES
from tasks import decks
from tasks.runtime import (
    dir_uri,
    export_s3_secrets,
    new_output_dir,
    ray_job,
    s3_secret_requests,
    setup_logging,
    transient_retries,
)

# Bump when the code of a cached step changes what it writes.
INGEST_CACHE = Cache(version="ingest-1", serialize=True, ignored_inputs=("source",))
FEATURES_CACHE = Cache(version="features-1", serialize=True)

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


@task(container_image=images.recommender, secret_requests=s3_secret_requests(), retries=2)
@transient_retries
def resolve_source(
    source: str, demo_events: int, demo_seed: int, run_date: datetime | None
) -> SourceOutputs:
    """Name the input and fingerprint its content (never cached: the content may change).

    `{date:...}` in `source` is filled from `run_date` (a schedule's kickoff time), e.g.
    s3://clicks/{date:%Y/%m}/. An empty `source` generates the deterministic demo clickstream,
    covering the 30 days before `run_date` when one is given.
    """
    setup_logging()
    export_s3_secrets()
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


@task(container_image=images.recommender)
def data_window(
    config: FeatureConfig, run_date: datetime | None, window_days: int
) -> FeatureConfig:
    """The feature config restricted to the window_days before run_date (unchanged if either is
    unset), so a scheduled run trains on the data its kickoff time selects."""
    if run_date is None or window_days <= 0:
        return config
    end = run_date if run_date.tzinfo else run_date.replace(tzinfo=UTC)
    return dataclasses.replace(config, window_end=end.isoformat(), window_days=window_days)


@task(
    container_image=images.recommender,
    task_config=ray_job(),
    cache=INGEST_CACHE,
    retries=1,
    secret_requests=s3_secret_requests(),
    enable_deck=True,
)
@transient_retries
def ingest_clickstream(source: str, fingerprint: str, config: IngestConfig) -> IngestOutputs:
    """Validate and bucket the events on Ray; the cache key is the content fingerprint."""
    setup_logging()
    export_s3_secrets()
    out = new_output_dir()
    report = ingest(source, out, config)
    rejects = pq.read_table(report.rejects_uri, filesystem=storage.filesystem(out)[0])
    decks.publish(
        "ingest",
        decks.table_html(
            {
                "source": report.source,
                "fingerprint": fingerprint[:16],
                "files": report.files,
                "bytes": report.bytes,
                "events": report.events,
                "rejects": report.rejects,
                "reject fraction": report.reject_fraction,
                "seconds": report.seconds,
                "rejects file": report.rejects_uri,
            },
            "Ingest",
        ),
        decks.bar_chart_html(report.events_by_type, "Events by type", "events", log=True),
        decks.table_html(report.rejects_by_reason, "Rejects by reason"),
        decks.table_html(rejects.slice(0, 20).to_pylist(), "First rejected records"),
    )
    return IngestOutputs(
        FlyteDirectory(report.events_uri, remote_directory=False),
        FlyteFile(report.rejects_uri, remote_path=False),
        report,
    )


@task(
    container_image=images.recommender,
    task_config=ray_job(),
    cache=FEATURES_CACHE,
    retries=1,
    enable_deck=True,
)
@transient_retries
def build_ratings(
    events: FlyteDirectory, report: IngestReport, config: FeatureConfig
) -> FeatureOutputs:
    """Implicit ratings, dense id maps and a per-user time split, one Ray task per bucket."""
    setup_logging()
    out = new_output_dir()
    profile = build_features(dir_uri(events), out, config, report)
    decks.publish(
        "data profile",
        decks.table_html(
            {k: v for k, v in profile.__dict__.items() if not isinstance(v, dict)}, "Profile"
        ),
        decks.bar_chart_html(profile.ratings_by_split, "Ratings per split", "ratings"),
        decks.bar_chart_html(profile.events_by_type, "Events by type", "events", log=True),
        decks.table_html(profile.rejects_by_reason, "Rejects by reason"),
        f"<pre>{json.dumps(config.event_weights)}</pre>",
    )
    split = {
        name: StructuredDataset(uri=storage.join(out, name))
        for name in ("train", "validation", "test")
    }
    return FeatureOutputs(
        split["train"],
        split["validation"],
        split["test"],
        FlyteDirectory(storage.join(out, "id_maps"), remote_directory=False),
        profile,
    )
