"""The recommendation job. `prepare_data` is its first stage: clickstream in, ratings out.

pyflyte run workflows/recommendation.py prepare_data                   # demo data
pyflyte run workflows/recommendation.py prepare_data --source s3://bucket/clickstream/
"""

from __future__ import annotations

from flytekit import workflow

from flyray.clickstream.config import FeatureConfig, IngestConfig
from flyray.recsys import FunkSVDParams
from flyray.recsys.distributed import DistributedConfig
from tasks.clickstream import FeatureOutputs, build_ratings, ingest_clickstream, resolve_source
from tasks.recommender import TrainOutputs, train_funksvd

DEFAULT_INGEST = IngestConfig()
DEFAULT_FEATURES = FeatureConfig()
DEFAULT_PARAMS = FunkSVDParams()
DEFAULT_TRAINING = DistributedConfig()


@workflow
def prepare_data(
    source: str = "",
    demo_events: int = 300_000,
    demo_seed: int = 0,
    ingest_config: IngestConfig = DEFAULT_INGEST,
    feature_config: FeatureConfig = DEFAULT_FEATURES,
) -> FeatureOutputs:
    """Ingest a clickstream (file, directory, glob or s3:// URI; empty: demo data) into
    ratings splits, id maps and a data profile."""
    src = resolve_source(source=source, demo_events=demo_events, demo_seed=demo_seed)
    ingested = ingest_clickstream(
        source=src.source, fingerprint=src.fingerprint, config=ingest_config
    )
    return build_ratings(events=ingested.events, report=ingested.report, config=feature_config)


@workflow
def train_recommender(
    source: str = "",
    demo_events: int = 300_000,
    demo_seed: int = 0,
    ingest_config: IngestConfig = DEFAULT_INGEST,
    feature_config: FeatureConfig = DEFAULT_FEATURES,
    params: FunkSVDParams = DEFAULT_PARAMS,
    training: DistributedConfig = DEFAULT_TRAINING,
) -> TrainOutputs:
    """prepare_data, then FunkSVD trained over Ray workers on its train/validation splits."""
    data = prepare_data(
        source=source,
        demo_events=demo_events,
        demo_seed=demo_seed,
        ingest_config=ingest_config,
        feature_config=feature_config,
    )
    return train_funksvd(
        train_ratings=data.train,
        validation_ratings=data.validation,
        id_maps=data.id_maps,
        params=params,
        config=training,
    )
