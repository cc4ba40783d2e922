"""Flyte task that trains FunkSVD on the prepared splits, on the task's Ray cluster."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
from flytekit import Cache, current_context, task
from flytekit.types.directory import FlyteDirectory

from flyray import storage
from flyray.recsys import FunkSVDParams
from flyray.recsys.distributed import DistributedConfig, Ratings, train
from tasks import decks
from tasks.clickstream import Ratings as RatingsDataset
from tasks.runtime import (
    export_s3_secrets,
    new_output_dir,
    ray_job,
    s3_secret_requests,
    setup_logging,
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
    fs, path = storage.filesystem(dataset.uri or dataset.literal.uri)
    table = pq.read_table(path, filesystem=fs, columns=["user_idx", "item_idx", "rating"])
    return Ratings(
        table["user_idx"].to_numpy(), table["item_idx"].to_numpy(), table["rating"].to_numpy()
    )


def _id_map(id_maps: FlyteDirectory, name: str, column: str) -> np.ndarray:
    uri = id_maps.remote_source or id_maps.path
    fs, path = storage.filesystem(storage.join(uri, f"{name}.parquet"))
    return pq.read_table(path, filesystem=fs, columns=[column])[column].to_numpy()


@task(
    task_config=ray_job(),
    cache=TRAIN_CACHE,
    retries=2,
    secret_requests=s3_secret_requests(),
    enable_deck=True,
)
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
