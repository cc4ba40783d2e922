"""What the recommender shows and records: the training and evaluation reports, their decks,
what the MLflow run holds and the model's task identity."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass

import numpy as np

from flyray import decks
from flyray.clickstream.config import FeatureConfig
from flyray.clickstream.reports import DataProfile
from flyray.drift import Column
from flyray.recsys.evaluate import Metrics, champion_metrics
from flyray.recsys.model import FactorModel, Ratings
from flyray.recsys.pyfunc import log_pyfunc
from flyray.recsys.tuning import TuningReport
from flyray.registry import Candidate, RunRecord, TaskIdentity


@dataclass
class TrainingReport:
    """Per-epoch curves and where the work ran: the training task's typed metrics output."""

    workers: int
    train_ratings: int
    epochs: list[int]
    train_rmse: list[float]
    validation_rmse: list[float]
    epoch_seconds: list[float]
    ratings_per_worker: list[int]
    resumed_from_epoch: int = 0  # > 0: this attempt went on from a checkpoint

    @classmethod
    def of(cls, model: FactorModel) -> TrainingReport:
        history = model.history
        last = history[-1].workers if history else []
        return cls(
            workers=len(last),
            train_ratings=int(model.seen_indptr[-1]),
            epochs=[h.epoch for h in history],
            train_rmse=[h.train_rmse for h in history],
            validation_rmse=[
                float("nan") if h.validation_rmse is None else h.validation_rmse for h in history
            ],
            epoch_seconds=[h.seconds for h in history],
            ratings_per_worker=[w["ratings"] for w in last],
            resumed_from_epoch=model.resumed_from_epoch,
        )


@dataclass
class EvaluationReport:
    """The model and its baselines on the same held-out split."""

    k: int
    model: Metrics
    biases: Metrics
    popularity: Metrics


_NAMES = {"funksvd": "FunkSVD", "ials": "iALS"}


def training_deck(report: TrainingReport, model: FactorModel) -> list[str]:
    """Curves, work per worker and hyperparameters of a training; iALS has no validation RMSE
    and its train RMSE is the fit of preferences on interactions."""
    curves = {"train RMSE": report.train_rmse, "validation RMSE": report.validation_rmse}
    name = _NAMES.get(model.name, model.name)
    workers = model.history[-1].workers if model.history else []
    return [
        decks.line_chart_html(report.epochs, curves, f"{name} training curves", "epoch", "RMSE"),
        decks.table_html(workers, "Ratings per worker"),
        decks.table_html(model.trainer.get("params", {}), "Hyperparameters"),
    ]


def evaluation_deck(report: EvaluationReport) -> list[str]:
    k = report.k
    rows = [asdict(m) for m in (report.model, report.biases, report.popularity)]
    ranking = {
        m["model"]: {f"{n}@{k}": m[n] for n in ("precision", "recall", "ndcg", "map")} for m in rows
    }
    title = (
        f"Held-out evaluation at k={k}, ranking metrics on {report.model.users:,} of "
        f"{report.model.test_users:,} test users"
    )
    return [
        decks.table_html(rows, title),
        decks.grouped_bar_html(ranking, "Ranking metrics", "value"),
    ]


def identity(source: str, features: FeatureConfig, metric: str) -> TaskIdentity:
    """The source as configured (a template before it is filled) and how events become ratings;
    the data window's end is left out, so each nightly window competes with its champion."""
    settings = {k: v for k, v in asdict(features).items() if k != "window_end"}
    return TaskIdentity(
        workload="recommendation",
        target="top-k unseen items per user",
        inputs="clickstream events",
        metric=metric,
        source=source or "generated demo clickstream",
        settings=json.dumps(settings, sort_keys=True),
    )


def run_record(
    training: TrainingReport,
    evaluation: EvaluationReport,
    profile: DataProfile,
    trainer: dict,
    tuning: TuningReport | None = None,
) -> RunRecord:
    """`trainer`: the model's trainer and hyperparameters (FactorModel.trainer); `tuning`: the
    search that chose them (its trials table, best parameters and the plot of validation NDCG
    per trial)."""
    metrics = dict(evaluation.model.as_mlflow())
    for baseline in (evaluation.biases, evaluation.popularity):
        metrics.update({f"{baseline.model}.{k}": v for k, v in baseline.as_mlflow().items()})
    metrics.update({"data.users": profile.users, "data.items": profile.items,
                    "data.events": profile.events, "data.sparsity": profile.sparsity})  # fmt: skip
    curves = {
        epoch: {"train_rmse": tr, "validation_rmse": va}
        for epoch, tr, va in zip(
            training.epochs, training.train_rmse, training.validation_rmse, strict=True
        )
    }
    record = RunRecord(
        params={
            "model.family": trainer["name"],
            **{f"model.{k}": v for k, v in trainer["params"].items()},
            "training.workers": training.workers,
        },  # fmt: skip
        metrics=metrics,
        curves=curves,
        documents={"data_profile.json": asdict(profile)},
    )
    if tuning is not None and (tuning.table or tuning.decision):
        record.documents["tuning.json"] = asdict(tuning)
    if tuning is not None and tuning.table:
        record.params["tuning.trials"] = tuning.trials
        record.metrics[f"tuning.best_validation_{tuning.metric.replace('@', '_at_')}"] = (
            tuning.best_score
        )
        record.files.append(tuning.plot(os.path.join(tempfile.mkdtemp(), "tuning_ndcg.png")))
    return record


def log_model(model: FactorModel, registered_name: str | None):
    """The model as an MLflow pyfunc (saved files as its artifact)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save(f"{tmp}/model")
        return log_pyfunc(model, f"{tmp}/model", registered_name=registered_name)


def candidate(
    model: FactorModel, train: Ratings, test: Ratings, training: TrainingReport,
    evaluation: EvaluationReport, profile: DataProfile, source: str, features: FeatureConfig,
    ranking_users: int, metric: str,
    tuning: TuningReport | None = None,
) -> Candidate:  # fmt: skip
    """The model for the registry, judged against popularity; the champion is ranked for the
    same sampled users of the same test split."""
    k = evaluation.k
    return Candidate(
        identity(source, features, metric),
        run_record(training, evaluation, profile, model.trainer, tuning),
        lambda name: log_model(model, name),
        evaluation.model.get(metric),
        evaluation.popularity.get(metric),
        lambda uri: champion_metrics(uri, model, train, test, k, ranking_users).get(metric),
        drift_columns(model, train, profile),
    )


def drift_columns(model: FactorModel, train: Ratings, profile: DataProfile) -> dict[str, Column]:
    """What a recommender's data drift is measured on: events by type, the share of training
    interactions of each item (raw ids, so a different id map compares), and interactions per
    user."""
    per_item = np.bincount(train.items, minlength=len(model.item_ids))
    seen = np.flatnonzero(per_item)
    raw = zip(np.asarray(model.item_ids)[seen].tolist(), per_item[seen].tolist(), strict=True)
    return {
        "event_type": Column(counts=dict(profile.events_by_type)),
        "item_popularity": Column(counts={str(i): float(c) for i, c in raw}),
        "user_activity": Column(values=np.bincount(train.users)[np.unique(train.users)]),
    }
