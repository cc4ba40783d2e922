"""Flyte tasks of the recommender after data preparation: train, evaluate, register, recommend."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from typing import NamedTuple

import mlflow
import numpy as np
import pyarrow.parquet as pq
from flytekit import Cache, StructuredDataset, current_context, task
from flytekit.types.directory import FlyteDirectory

import images
from flyray import registry, storage
from flyray.clickstream.reports import DataProfile
from flyray.recsys import FunkSVD, FunkSVDParams
from flyray.recsys.batch import recommend_all
from flyray.recsys.distributed import DistributedConfig, Ratings, train
from flyray.recsys.evaluate import Metrics, biases_model, evaluate, popularity_model
from flyray.recsys.pyfunc import log_pyfunc
from flyray.registry import Registration, champion_gate
from tasks import decks
from tasks.clickstream import Ratings as RatingsDataset
from tasks.runtime import (
    dataset_uri,
    dir_uri,
    export_s3_secrets,
    new_output_dir,
    ray_job,
    s3_secret_requests,
    setup_logging,
    transient_retries,
)

TRAIN_CACHE = Cache(version="train-1", serialize=True)


@dataclass
class TrainingReport:
    """Per-epoch curves and where the work ran: the task's typed metrics output."""

    strategy: str
    workers: int
    train_ratings: int
    epochs: list[int]
    train_rmse: list[float]
    validation_rmse: list[float]
    epoch_seconds: list[float]
    ratings_per_worker: list[int]


class TrainOutputs(NamedTuple):
    model: FlyteDirectory
    report: TrainingReport


def _read_ratings(dataset) -> Ratings:
    """Read a ratings split in place (an input dataset carries its location on its literal)."""
    fs, path = storage.filesystem(dataset_uri(dataset))
    table = pq.read_table(path, filesystem=fs, columns=["user_idx", "item_idx", "rating"])
    return Ratings(
        table["user_idx"].to_numpy(), table["item_idx"].to_numpy(), table["rating"].to_numpy()
    )


def _id_map(id_maps: FlyteDirectory, name: str, column: str) -> np.ndarray:
    uri = dir_uri(id_maps)
    fs, path = storage.filesystem(storage.join(uri, f"{name}.parquet"))
    return pq.read_table(path, filesystem=fs, columns=[column])[column].to_numpy()


@task(
    container_image=images.recommender,
    task_config=ray_job(),
    cache=TRAIN_CACHE,
    retries=2,
    secret_requests=s3_secret_requests(),
    enable_deck=True,
)
@transient_retries
def train_funksvd(
    train_ratings: RatingsDataset,
    validation_ratings: RatingsDataset,
    id_maps: FlyteDirectory,
    params: FunkSVDParams,
    config: DistributedConfig,
) -> TrainOutputs:
    """FunkSVD over Ray workers (dsgd by default). Without a checkpoint_uri, checkpoints go to
    Flyte's per-task checkpoint, so a retried attempt resumes where the failed one stopped."""
    setup_logging()
    export_s3_secrets()
    user_ids = _id_map(id_maps, "users", "user_id")
    item_ids = _id_map(id_maps, "items", "item_id")
    flyte_checkpoint = current_context().checkpoint
    local_ckpt = tempfile.mkdtemp(prefix="funksvd-ckpt-")
    after = None
    if not config.checkpoint_uri and flyte_checkpoint is not None:
        if flyte_checkpoint.prev_exists():
            flyte_checkpoint.restore(local_ckpt)
        config = DistributedConfig(**{**config.__dict__, "checkpoint_uri": local_ckpt})
        after = lambda epoch: flyte_checkpoint.save(local_ckpt)  # noqa: E731
    model = train(
        _read_ratings(train_ratings), len(user_ids), len(item_ids), params, config,
        _read_ratings(validation_ratings), user_ids, item_ids, after_checkpoint=after,
    )  # fmt: skip
    out = storage.join(new_output_dir(), "model")
    model.save(out)
    history = model.history
    report = TrainingReport(
        strategy=config.strategy,
        workers=len(history[-1].workers) if history else 0,
        train_ratings=int(model.seen_indptr[-1]),
        epochs=[h.epoch for h in history],
        train_rmse=[h.train_rmse for h in history],
        validation_rmse=[
            h.validation_rmse if h.validation_rmse is not None else float("nan") for h in history
        ],
        epoch_seconds=[h.seconds for h in history],
        ratings_per_worker=[w["ratings"] for w in history[-1].workers] if history else [],
    )
    decks.publish(
        "training",
        decks.line_chart_html(
            report.epochs,
            {"train RMSE": report.train_rmse, "validation RMSE": report.validation_rmse},
            "FunkSVD training curves", "epoch", "RMSE",
        ),
        decks.table_html(history[-1].workers if history else [], "Ratings per worker"),
        decks.table_html({k: v for k, v in params.__dict__.items()}, "Hyperparameters"),
    )  # fmt: skip
    return TrainOutputs(FlyteDirectory(out, remote_directory=False), report)


@dataclass
class EvaluationReport:
    """The model and its baselines on the same held-out split."""

    k: int
    model: Metrics
    biases: Metrics
    popularity: Metrics


@dataclass
class RegistryConfig:
    model_name: str = "flyray-funksvd"
    experiment: str = "flyray-recommender"
    metric: str = "ndcg@10"  # the gate's metric; higher is better
    baseline: str = "popularity"  # the baseline a new version must also beat


@task(
    container_image=images.recommender,
    task_config=ray_job(),
    cache=Cache(version="evaluate-2", serialize=True),
    retries=1,
    enable_deck=True,
)
@transient_retries
def evaluate_model(
    model_dir: FlyteDirectory,
    train_ratings: RatingsDataset,
    test_ratings: RatingsDataset,
    params: FunkSVDParams,
    k: int,
    ranking_users: int,
) -> EvaluationReport:
    """Rating and ranking metrics of the model beside biases-only and popularity baselines;
    ranking metrics on at most `ranking_users` test users (0 = all; see flyray.recsys.evaluate)."""
    setup_logging()
    model = FunkSVD.load(dir_uri(model_dir))
    train_r, test_r = _read_ratings(train_ratings), _read_ratings(test_ratings)
    n_users, n_items = len(model.user_ids), len(model.item_ids)
    biases = biases_model(train_r, n_users, n_items, params)
    report = EvaluationReport(
        k,
        evaluate(model, test_r, k, "funksvd", max_users=ranking_users),
        evaluate(biases, test_r, k, "biases", max_users=ranking_users),
        evaluate(popularity_model(train_r, n_users, n_items), test_r, k, "popularity",
                 rating_metrics=False, max_users=ranking_users),
    )  # fmt: skip
    rows = [asdict(m) for m in (report.model, report.biases, report.popularity)]
    decks.publish(
        "evaluation",
        decks.table_html(
            rows,
            f"Held-out evaluation at k={k}, ranking metrics on {report.model.users:,} of "
            f"{report.model.test_users:,} test users",
        ),
        decks.grouped_bar_html(
            {
                m["model"]: {f"{n}@{k}": m[n] for n in ("precision", "recall", "ndcg", "map")}
                for m in rows
            },  # fmt: skip
            "Ranking metrics",
            "value",
        ),
    )
    return report


@task(
    container_image=images.recommender,
    task_config=ray_job(),
    cache=Cache(version="recommend-1", serialize=True),
    retries=1,
)
@transient_retries
def recommend_users(model_dir: FlyteDirectory, n: int) -> StructuredDataset:
    """Top-n unseen items for every user (Ray Data), as parquet."""
    setup_logging()
    export_s3_secrets()
    out = storage.join(new_output_dir(), "recommendations")
    recommend_all(FunkSVD.load(dir_uri(model_dir)), out, n)
    return StructuredDataset(uri=out)


@task(
    container_image=images.recommender,
    retries=2,
    secret_requests=s3_secret_requests(),
    enable_deck=True,
)
@transient_retries
def register_model(
    model_dir: FlyteDirectory,
    training: TrainingReport,
    evaluation: EvaluationReport,
    profile: DataProfile,
    params: FunkSVDParams,
    config: RegistryConfig,
) -> Registration:
    """One MLflow run per execution, the pyfunc registered, then the champion gate."""
    setup_logging()
    export_s3_secrets()
    registry.use_experiment(config.experiment)
    execution = current_context().execution_id
    local_model = FunkSVD.load(dir_uri(model_dir))
    with (
        tempfile.TemporaryDirectory() as tmp,
        mlflow.start_run(
            tags={
                "flyte.execution_id": execution.name,
                "flyte.project": execution.project,
                "flyte.domain": execution.domain,
                "workload": "recommendation",
            }  # fmt: skip
        ) as run,
    ):
        mlflow.log_params({f"model.{k}": v for k, v in asdict(params).items()})
        mlflow.log_params(
            {"training.strategy": training.strategy, "training.workers": training.workers}
        )
        for epoch, tr, va in zip(
            training.epochs, training.train_rmse, training.validation_rmse, strict=True
        ):
            mlflow.log_metrics({"train_rmse": tr, "validation_rmse": va}, step=epoch)
        for metrics in (evaluation.model, evaluation.biases, evaluation.popularity):
            prefix = "" if metrics is evaluation.model else f"{metrics.model}."
            mlflow.log_metrics({prefix + k: v for k, v in metrics.as_mlflow().items() if v == v})
        mlflow.log_dict(asdict(profile), "data_profile.json")
        mlflow.log_metrics(
            {
                "data.users": profile.users,
                "data.items": profile.items,
                "data.events": profile.events,
                "data.sparsity": profile.sparsity,
            }  # fmt: skip
        )
        local_model.save(f"{tmp}/funksvd")
        info = log_pyfunc(local_model, f"{tmp}/funksvd", registered_name=config.model_name)
        version = str(info.registered_model_version)
        baseline = getattr(evaluation, config.baseline)
        decision = champion_gate(
            config.model_name, version, config.metric, evaluation.model.get(config.metric),
            baseline_value=baseline.get(config.metric),
        )  # fmt: skip
        mlflow.set_tags({"promotion": "champion" if decision.promoted else "rejected",
                         "promotion_reason": decision.reason})  # fmt: skip
    decks.publish("registry", decks.table_html(asdict(decision), "Champion gate"))
    return Registration(registry.tracking_uri(), run.info.run_id, decision)
