"""Flyte tasks of the tabular workload: source, prepare (Ray Data), train (Ray Train XGBoost),
evaluate, register (MLflow xgboost flavor behind the shared champion gate)."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from typing import NamedTuple

import mlflow
import pandas as pd
from flytekit import Cache, StructuredDataset, current_context, task
from flytekit.types.directory import FlyteDirectory
from mlflow.models import infer_signature

import images
from flyray import registry, storage
from flyray.registry import Registration, champion_gate
from flyray.tabular.data import (
    PARQUET_SUFFIXES,
    TableConfig,
    TableSpec,
    prepare,
    read_split,
    split_uri,
    write_breast_cancer,
)
from flyray.tabular.evaluate import BinaryMetrics, evaluate, prior_scores, roc_points
from flyray.tabular.train import (
    TrainConfig,
    TrainReport,
    XGBParams,
    load_model,
    predict,
    save_model,
    train_distributed,
)
from tasks import decks
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

# Bump a version when the step's code changes what it writes.
PREPARE_CACHE = Cache(version="tabular-prepare-1", serialize=True, ignored_inputs=("source",))
TRAIN_CACHE = Cache(version="xgboost-train-1", serialize=True)
EVALUATE_CACHE = Cache(version="xgboost-evaluate-1", serialize=True)


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
    report: TrainReport


@dataclass
class EvaluationReport:
    """The model and the prior-rate baseline on the test split, with what the deck plots."""

    model: BinaryMetrics
    baseline: BinaryMetrics
    feature_importance: dict[str, float]  # total gain per feature


@dataclass
class TabularRegistryConfig:
    model_name: str = "flyray-xgboost"
    experiment: str = "flyray-tabular"
    metric: str = "auc"  # the gate's metric; higher is better


@task(container_image=images.tabular, secret_requests=s3_secret_requests(), retries=2)
@transient_retries
def resolve_table(source: str, label: str) -> TableSource:
    """Name the input and fingerprint its content (never cached: the content may change). An
    empty source writes scikit-learn's bundled breast-cancer table as parquet."""
    setup_logging()
    export_s3_secrets()
    if not source:
        source = write_breast_cancer(storage.join(new_output_dir(), "demo"), label=label)
    return TableSource(
        source, storage.fingerprint(storage.list_input_files(source, PARQUET_SUFFIXES))
    )


@task(
    container_image=images.tabular,
    task_config=ray_job(),
    cache=PREPARE_CACHE,
    retries=1,
    secret_requests=s3_secret_requests(),
    enable_deck=True,
)
@transient_retries
def prepare_table(source: str, fingerprint: str, config: TableConfig) -> PreparedTable:
    """Validate, encode and split the parquet input with Ray Data; cached on its fingerprint."""
    setup_logging()
    export_s3_secrets()
    out = new_output_dir()
    spec = prepare(source, out, config)
    decks.publish(
        "data",
        decks.table_html(
            {
                "source": spec.source,
                "fingerprint": fingerprint[:16],
                "files": spec.files,
                "rows": spec.rows,
                "rows without a label": spec.rejected_rows,
                "rejects": spec.rejects_uri,
                "label": spec.label,
                "classes (0, 1)": ", ".join(spec.label_classes),
                "positive rate": spec.positive_rate,
                "features": len(spec.features),
                "categorical": ", ".join(spec.categories),
            },
            "Table",
        ),  # fmt: skip
        decks.bar_chart_html(spec.rows_by_split, "Rows per split", "rows"),
    )
    splits = {n: StructuredDataset(uri=split_uri(out, n)) for n in ("train", "validation", "test")}
    return PreparedTable(splits["train"], splits["validation"], splits["test"], spec)


@task(
    container_image=images.tabular,
    task_config=ray_job(),
    cache=TRAIN_CACHE,
    retries=2,
    secret_requests=s3_secret_requests(),
    enable_deck=True,
)
@transient_retries
def train_xgboost(
    train: StructuredDataset,
    validation: StructuredDataset,
    spec: TableSpec,
    params: XGBParams,
    config: TrainConfig,
) -> TrainOutputs:
    """XGBoost data-parallel over Ray Train workers, early stopping on the validation split.
    Checkpoints go to config.storage_uri, or under the execution's output prefix (shared by
    every node of the Ray cluster, which Ray Train needs)."""
    setup_logging()
    export_s3_secrets()
    out = new_output_dir()
    if not config.storage_uri:
        config = TrainConfig(**{**asdict(config), "storage_uri": storage.join(out, "checkpoints")})
    booster, report = train_distributed(
        dataset_uri(train), dataset_uri(validation), spec, params, config
    )
    model_uri = save_model(booster, spec, storage.join(out, "model"))
    rounds = list(range(report.restored_from_round + 1,
                        report.restored_from_round + 1 + len(report.validation_auc)))  # fmt: skip
    decks.publish(
        "training",
        decks.line_chart_html(
            rounds, {"validation AUC": report.validation_auc}, "Validation AUC", "round", "AUC"
        ),  # fmt: skip
        decks.line_chart_html(
            rounds,
            {"validation logloss": report.validation_logloss},
            "Validation logloss",
            "round",
            "logloss",
        ),  # fmt: skip
        decks.bar_chart_html(
            {
                "start-up": report.startup_seconds,
                "data": report.data_seconds,
                "boosting": report.boosting_seconds,
            },
            "Where the time went",
            "seconds",
        ),  # fmt: skip
        decks.table_html(
            {k: v for k, v in asdict(report).items() if not isinstance(v, list)}, "Training"
        ),  # fmt: skip
        decks.table_html(asdict(params), "Hyperparameters"),
    )
    return TrainOutputs(FlyteDirectory(model_uri, remote_directory=False), report)


def _roc_html(curves: dict[str, tuple[list[float], list[float]]]) -> str:
    fig, ax = decks.plt.subplots(figsize=(4.5, 4.5))
    for label, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=label)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curve (test split)")
    ax.legend()
    return decks.figure_html(fig)


@task(container_image=images.tabular, cache=EVALUATE_CACHE, retries=1, enable_deck=True)
@transient_retries
def evaluate_xgboost(model: FlyteDirectory, test: StructuredDataset) -> EvaluationReport:
    """Test-split metrics of the model and of the prior-rate baseline, ROC and importance.
    One process: predicting a held-out split is one multi-threaded xgboost call."""
    setup_logging()
    export_s3_secrets()
    booster, spec = load_model(dir_uri(model))
    x, y = read_split(dataset_uri(test), spec)
    scores = predict(booster, spec, x)
    baseline_scores = prior_scores(spec.positive_rate, len(y))
    gain = booster.get_score(importance_type="total_gain")
    report = EvaluationReport(
        evaluate(scores, y, "xgboost"),
        evaluate(baseline_scores, y, "prior rate"),
        {f: float(gain.get(f, 0.0)) for f in spec.features},
    )
    top = dict(sorted(report.feature_importance.items(), key=lambda kv: -kv[1])[:20])
    (tn, fp), (fn, tp) = report.model.confusion
    decks.publish(
        "evaluation",
        decks.table_html(
            [
                {k: v for k, v in asdict(m).items() if k != "confusion"}
                for m in (report.model, report.baseline)
            ],
            "Test split",
        ),  # fmt: skip
        decks.table_html(
            [
                {
                    "": f"actual {spec.label_classes[0]}",
                    f"predicted {spec.label_classes[0]}": tn,
                    f"predicted {spec.label_classes[1]}": fp,
                },
                {
                    "": f"actual {spec.label_classes[1]}",
                    f"predicted {spec.label_classes[0]}": fn,
                    f"predicted {spec.label_classes[1]}": tp,
                },
            ],
            f"Confusion matrix at {report.model.threshold}",
        ),  # fmt: skip
        _roc_html(
            {"xgboost": roc_points(scores, y), "prior rate": roc_points(baseline_scores, y)}
        ),  # fmt: skip
        decks.bar_chart_html(top, "Feature importance (total gain)", "gain"),
    )
    return report


@task(
    container_image=images.tabular,
    retries=2,
    secret_requests=s3_secret_requests(),
    enable_deck=True,
)
@transient_retries
def register_xgboost(
    model: FlyteDirectory,
    test: StructuredDataset,
    training: TrainReport,
    evaluation: EvaluationReport,
    params: XGBParams,
    config: TabularRegistryConfig,
) -> Registration:
    """One MLflow run per execution, the booster registered with the xgboost flavor and its
    signature, then the shared champion gate against the prior-rate baseline."""
    setup_logging()
    export_s3_secrets()
    booster, spec = load_model(dir_uri(model))
    x, _ = read_split(dataset_uri(test), spec)
    example = pd.DataFrame(x[:5], columns=spec.features)
    registry.use_experiment(config.experiment)
    execution = current_context().execution_id
    tags = {"flyte.execution_id": execution.name, "flyte.project": execution.project,
            "flyte.domain": execution.domain, "workload": "tabular"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(tags=tags) as run:
        mlflow.log_params({f"model.{k}": v for k, v in asdict(params).items()})
        mlflow.log_params({"training.workers": training.workers, "data.source": spec.source,
                           "data.label": spec.label, "data.rows": spec.rows})  # fmt: skip
        for step, (auc, loss) in enumerate(
            zip(training.validation_auc, training.validation_logloss, strict=True),
            start=training.restored_from_round + 1,
        ):
            mlflow.log_metrics({"validation_auc": auc, "validation_logloss": loss}, step=step)
        mlflow.log_metrics(evaluation.model.as_mlflow())
        mlflow.log_metrics({f"baseline.{k}": v for k, v in evaluation.baseline.as_mlflow().items()})
        mlflow.log_dict(asdict(spec), "encoding.json")
        info = mlflow.xgboost.log_model(
            booster, name="model", model_format="json", registered_model_name=config.model_name,
            signature=infer_signature(example, predict(booster, spec, x[:5])),
            input_example=example, extra_files=[_write(tmp, "spec.json", spec.to_json())],
        )  # fmt: skip
        decision = champion_gate(
            config.model_name, str(info.registered_model_version), config.metric,
            getattr(evaluation.model, config.metric),
            baseline_value=getattr(evaluation.baseline, config.metric),
        )  # fmt: skip
        mlflow.set_tags({"promotion": "champion" if decision.promoted else "rejected",
                         "promotion_reason": decision.reason})  # fmt: skip
    decks.publish("registry", decks.table_html(asdict(decision), "Champion gate"))
    return Registration(registry.tracking_uri(), run.info.run_id, decision)


def _write(folder: str, name: str, text: str) -> str:
    path = f"{folder}/{name}"
    with open(path, "w") as fh:
        fh.write(text)
    return path
