"""The recommendation job. `prepare_data` is its first stage: clickstream in, ratings out.

pyflyte run workflows/recommendation.py prepare_data                   # demo data
pyflyte run workflows/recommendation.py prepare_data --source s3://bucket/clickstream/
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from flytekit import (
    CronSchedule,
    Email,
    LaunchPlan,
    StructuredDataset,
    WorkflowExecutionPhase,
    workflow,
)
from flytekit.types.directory import FlyteDirectory

import images
from flyray.clickstream.config import FeatureConfig, IngestConfig
from flyray.raytrain import DistributedConfig
from flyray.recsys import FunkSVDParams
from flyray.recsys.ials import IALSParams
from flyray.recsys.report import EvaluationReport, TrainingReport
from flyray.recsys.tuning import TuningConfig, TuningReport
from flyray.registry import Registration, RegistryConfig
from tasks.clickstream import (
    FeatureOutputs,
    build_ratings,
    data_window,
    ingest_clickstream,
    resolve_source,
)
from tasks.deployment import current
from tasks.recipe import recipe_task
from tasks.recommender import (
    evaluate_model,
    recommend_users,
    register_model,
    train_recommender,
    tune_params,
)

# The pipeline's model: implicit feedback (3 negatives per rating at 0, redrawn every epoch by
# popularity ** 0.5) ranks held-out items far better than explicit-rating FunkSVD, which loses to
# item popularity on clicks. Chosen by bench.recsys's Ray Tune search on the 1M demo's
# validation split (docs/recommendation-quality.md); `make run` searches on from here.
PIPELINE_PARAMS = FunkSVDParams(
    n_factors=64, n_epochs=25, lr=0.015, reg=0.05, negatives=3, negative_rating=0.0,
    rating_min=0.0, negative_beta=0.5,
)  # fmt: skip
# The second model family (`model="ials"`): implicit ALS, confidence 1 + alpha * rating. Strong
# regularisation and high confidence hold up on validation across bench.recsys's datasets.
IALS_PARAMS = IALSParams(n_factors=64, n_epochs=15, reg=10.0, alpha=30.0)
DEFAULT_REGISTRATION = RegistryConfig("flyray-funksvd", "flyray-recommender", "ndcg@10")


@workflow
def prepare_data(
    source: str = "",
    demo_events: int = 300_000,
    demo_seed: int = 0,
    ingest_config: IngestConfig = IngestConfig(),
    feature_config: FeatureConfig = FeatureConfig(),
    run_date: datetime | None = None,
    window_days: int = 0,
) -> FeatureOutputs:
    """Ingest a clickstream (file, directory, glob or s3:// URI; empty: demo data) into
    ratings splits, id maps and a data profile."""
    src = resolve_source(
        source=source, demo_events=demo_events, demo_seed=demo_seed, run_date=run_date
    )
    ingested = ingest_clickstream(
        source=src.source, fingerprint=src.fingerprint, config=ingest_config
    )
    windowed = data_window(config=feature_config, run_date=run_date, window_days=window_days)
    return build_ratings(events=ingested.events, report=ingested.report, config=windowed)


class PipelineOutputs(NamedTuple):
    model: FlyteDirectory
    training: TrainingReport
    evaluation: EvaluationReport
    registration: Registration
    recommendations: StructuredDataset
    tuning: TuningReport


@workflow
def recommendation_pipeline(
    source: str = "",
    demo_events: int = 1_000_000,
    demo_seed: int = 0,
    ingest_config: IngestConfig = IngestConfig(),
    feature_config: FeatureConfig = FeatureConfig(),
    params: FunkSVDParams = PIPELINE_PARAMS,
    training: DistributedConfig = DistributedConfig(),
    model: str = "funksvd",
    ials_params: IALSParams = IALS_PARAMS,
    tuning: TuningConfig = TuningConfig(),
    k: int = 10,
    ranking_users: int = 20_000,
    n_recommendations: int = 10,
    registration: RegistryConfig = DEFAULT_REGISTRATION,
    run_date: datetime | None = None,
    window_days: int = 0,
) -> PipelineOutputs:
    """The main job: clickstream -> ratings -> Ray Tune search on validation NDCG -> the best
    model (FunkSVD or iALS, `model`) trained on Ray -> evaluation against baselines -> MLflow
    registry behind the champion gate, plus top-N recommendations for every user."""
    recipe = pipeline_recipe(**locals())  # the inputs, recorded with the version (tasks/recipe.py)
    data = prepare_data(
        source=source, demo_events=demo_events, demo_seed=demo_seed, ingest_config=ingest_config,
        feature_config=feature_config, run_date=run_date, window_days=window_days,
    )  # fmt: skip
    tuned = tune_params(
        train_ratings=data.train, validation_ratings=data.validation, id_maps=data.id_maps,
        model=model, params=params, ials_params=ials_params, config=tuning,
    )  # fmt: skip
    trained = train_recommender(
        train_ratings=data.train, validation_ratings=data.validation, id_maps=data.id_maps,
        params=tuned.funksvd, config=training, model=tuned.model, ials_params=tuned.ials,
    )  # fmt: skip
    evaluation = evaluate_model(
        model_dir=trained.model, train_ratings=data.train, test_ratings=data.test, params=params,
        k=k, ranking_users=ranking_users,
    )  # fmt: skip
    registered = register_model(
        model_dir=trained.model, train_ratings=data.train, test_ratings=data.test,
        training=trained.report, evaluation=evaluation, profile=data.profile,
        source=source, features=feature_config, ranking_users=ranking_users, config=registration,
        tuning=tuned.report, recipe=recipe,
    )  # fmt: skip
    recommendations = recommend_users(model_dir=trained.model, n=n_recommendations)
    return PipelineOutputs(
        trained.model, trained.report, evaluation, registered, recommendations, tuned.report
    )


pipeline_recipe = recipe_task(recommendation_pipeline, images.recommender, "pipeline_recipe")
default_plan = LaunchPlan.get_or_create(recommendation_pipeline, name="recommendation_default")


def nightly_notifications() -> list[Email]:
    """An email to FLYRAY_NIGHTLY_NOTIFY (comma-separated addresses, read when registering) when
    a nightly run fails, times out or is aborted; none when it is unset."""
    to = list(current().nightly_notify)
    failed = [WorkflowExecutionPhase.FAILED, WorkflowExecutionPhase.TIMED_OUT,
              WorkflowExecutionPhase.ABORTED]  # fmt: skip
    return [Email(phases=failed, recipients_email=to)] if to else []


# Nightly retrain at 03:00 UTC. The kickoff time becomes run_date, which selects the data:
# events of the FLYRAY_NIGHTLY_WINDOW_DAYS (default 30) days before it, from
# FLYRAY_NIGHTLY_SOURCE (read when registering; may be a template such as
# s3://clicks/{date:%Y/%m}/; empty: demo data generated for that window).
nightly_plan = LaunchPlan.get_or_create(
    recommendation_pipeline,
    name="recommendation_nightly",
    default_inputs={
        "source": current().nightly_source,
        "window_days": current().nightly_window_days,
    },
    schedule=CronSchedule(schedule="0 3 * * *", kickoff_time_input_arg="run_date"),
    notifications=nightly_notifications(),
)
