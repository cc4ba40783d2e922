"""Flyte tasks of the tabular workload: source, prepare (Ray Data), train (Ray Train XGBoost),
evaluate, register (MLflow xgboost flavor behind the shared champion gate)."""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from flytekit import StructuredDataset
from flytekit.types.directory import FlyteDirectory

import images
from flyray import storage
from flyray.lineage import DataInput
from flyray.raytrain import DistributedConfig
from flyray.registry import Registration, RegistryConfig
from flyray.tabular import report
from flyray.tabular.data import (
    PARQUET_SUFFIXES,
    TableConfig,
    TableSpec,
    prepare,
    read_split,
    split_uri,
    write_breast_cancer,
)
from flyray.tabular.report import EvaluationReport
from flyray.tabular.train import (
    TrainingReport,
    XGBParams,
    load_model,
    save_model,
    train_distributed,
)
from tasks.outputs import new_output_dir, publish, register, uri
from tasks.platform import flyray_task, minutes, sized_by_run

SPLITS = ("train", "validation", "test")


class TableSource(NamedTuple):
    source: str
    fingerprint: str


class PreparedTable(NamedTuple):
    train: StructuredDataset
    validation: StructuredDataset
    test: StructuredDataset
    spec: TableSpec


class TrainOutputs(NamedTuple):
    model: FlyteDirectory
    report: TrainingReport


@flyray_task(images.tabular, timeout=minutes(15))
def resolve_table(source: str, label: str) -> TableSource:
    """Name the input and fingerprint its content (never cached: the content may change). An
    empty source writes scikit-learn's bundled breast-cancer table as parquet."""
    if not source:
        source = write_breast_cancer(storage.join(new_output_dir(), "demo"), label=label)
    files = storage.list_input_files(source, PARQUET_SUFFIXES)
    return TableSource(source, storage.fingerprint(files))


@flyray_task(
    images.tabular, ray=True, cache="tabular-prepare-2", cache_ignore=("source",), deck=True,
    timeout=minutes(60),
)  # fmt: skip
def prepare_table(source: str, fingerprint: str, config: TableConfig) -> PreparedTable:
    """Validate, encode and split the parquet input with Ray Data; cached on its fingerprint."""
    out = new_output_dir()
    spec = replace(prepare(source, out, config), fingerprint=fingerprint)
    publish("data", *report.data_deck(spec, fingerprint))
    return PreparedTable(*(StructuredDataset(uri=split_uri(out, n)) for n in SPLITS), spec)


@flyray_task(
    images.tabular,
    ray=DistributedConfig(),
    cache="xgboost-train-2",
    deck=True,
    checkpoints="xgboost",
    timeout=minutes(180),
)
def fit_xgboost(
    train: StructuredDataset,
    validation: StructuredDataset,
    spec: TableSpec,
    params: XGBParams,
    config: DistributedConfig,
) -> TrainOutputs:
    """XGBoost data-parallel over Ray Train workers, early stopping on the validation split;
    a Flyte retry resumes from the failed attempt's last checkpoint."""
    booster, trained = train_distributed(uri(train), uri(validation), spec, params, config)
    model_uri = save_model(booster, spec, storage.join(new_output_dir(), "model"))
    publish("training", *report.training_deck(trained, params))
    return TrainOutputs(FlyteDirectory(model_uri, remote_directory=False), trained)


train_xgboost = sized_by_run(fit_xgboost, "train_xgboost")


@flyray_task(images.tabular, cache="xgboost-evaluate-1", deck=True, timeout=minutes(30))
def evaluate_xgboost(model: FlyteDirectory, test: StructuredDataset) -> EvaluationReport:
    """Test-split metrics of the model and of the prior-rate baseline, ROC and importance.
    One process: predicting a held-out split is one multi-threaded xgboost call."""
    booster, spec = load_model(uri(model))
    x, y = read_split(uri(test), spec)
    evaluation, scores, baseline_scores = report.evaluate_booster(booster, spec, x, y)
    publish("evaluation", *report.evaluation_deck(evaluation, spec, y, scores, baseline_scores))
    return evaluation


@flyray_task(images.tabular, deck=True, gate=True, timeout=minutes(30))
def register_xgboost(
    model: FlyteDirectory,
    test: StructuredDataset,
    training: TrainingReport,
    evaluation: EvaluationReport,
    params: XGBParams,
    config: RegistryConfig,
    recipe: str,
) -> Registration:
    """The booster in MLflow (xgboost flavor, signature, encoding), then the champion gate:
    the champion is scored on this model's test split."""
    booster, spec = load_model(uri(model))
    x, y = read_split(uri(test), spec)
    evidence = report.candidate(booster, spec, x, y, training, evaluation, params, config.metric)
    table = DataInput("table", spec.source, spec.fingerprint, rows=spec.rows)
    return register(config, evidence, images.tabular, (table,), recipe)
