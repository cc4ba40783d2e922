"""What the tabular workload shows and records: decks, the evaluation report, what the MLflow run
holds, the model's task identity and its flavor."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from flyray import decks
from flyray.drift import Column
from flyray.registry import Candidate, RunRecord, TaskIdentity
from flyray.tabular.data import TableSpec
from flyray.tabular.evaluate import (
    BinaryMetrics,
    champion_metrics,
    evaluate,
    prior_scores,
    roc_points,
)
from flyray.tabular.train import TrainingReport, XGBParams, predict


@dataclass
class EvaluationReport:
    """The model and the prior-rate baseline on the test split, with what the deck plots."""

    model: BinaryMetrics
    baseline: BinaryMetrics
    feature_importance: dict[str, float]  # total gain per feature


def evaluate_booster(booster, spec: TableSpec, x: np.ndarray, y: np.ndarray):
    """(report, model scores, baseline scores) on a held-out split."""
    scores = predict(booster, spec, x)
    baseline_scores = prior_scores(spec.positive_rate, len(y))
    gain = booster.get_score(importance_type="total_gain")
    report = EvaluationReport(
        evaluate(scores, y, "xgboost"),
        evaluate(baseline_scores, y, "prior rate"),
        {f: float(gain.get(f, 0.0)) for f in spec.features},
    )
    return report, scores, baseline_scores


def data_deck(spec: TableSpec, fingerprint: str) -> list[str]:
    facts = {
        "source": spec.source, "fingerprint": fingerprint[:16], "files": spec.files,
        "rows": spec.rows, "rows without a label": spec.rejected_rows,
        "rejects": spec.rejects_uri, "label": spec.label,
        "classes (0, 1)": ", ".join(spec.label_classes), "positive rate": spec.positive_rate,
        "features": len(spec.features), "categorical": ", ".join(spec.categories),
    }  # fmt: skip
    return [
        decks.table_html(facts, "Table"),
        decks.bar_chart_html(spec.rows_by_split, "Rows per split", "rows"),
    ]


def _rounds(report: TrainingReport) -> list[int]:
    first = report.restored_from_round + 1
    return list(range(first, first + len(report.validation_auc)))


def training_deck(report: TrainingReport, params: XGBParams) -> list[str]:
    rounds = _rounds(report)
    seconds = {"start-up": report.startup_seconds, "data": report.data_seconds,
               "boosting": report.boosting_seconds}  # fmt: skip
    scalars = {k: v for k, v in asdict(report).items() if not isinstance(v, list)}
    return [
        decks.line_chart_html(rounds, {"validation AUC": report.validation_auc},
                              "Validation AUC", "round", "AUC"),
        decks.line_chart_html(rounds, {"validation logloss": report.validation_logloss},
                              "Validation logloss", "round", "logloss"),
        decks.bar_chart_html(seconds, "Where the time went", "seconds"),
        decks.table_html(scalars, "Training"),
        decks.table_html(asdict(params), "Hyperparameters"),
    ]  # fmt: skip


def _roc_html(curves: dict[str, tuple[list[float], list[float]]]) -> str:
    fig, ax = decks.plt.subplots(figsize=(4.5, 4.5))
    for label, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=label)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test split)")
    ax.legend()
    return decks.figure_html(fig)


def evaluation_deck(
    report: EvaluationReport, spec: TableSpec, y: np.ndarray, scores, baseline_scores
) -> list[str]:
    top = dict(sorted(report.feature_importance.items(), key=lambda kv: -kv[1])[:20])
    (tn, fp), (fn, tp) = report.model.confusion
    neg, pos = spec.label_classes
    confusion = [
        {"": f"actual {neg}", f"predicted {neg}": tn, f"predicted {pos}": fp},
        {"": f"actual {pos}", f"predicted {neg}": fn, f"predicted {pos}": tp},
    ]
    rows = [
        {k: v for k, v in asdict(m).items() if k != "confusion"}
        for m in (report.model, report.baseline)
    ]
    curves = {"xgboost": roc_points(scores, y), "prior rate": roc_points(baseline_scores, y)}
    return [
        decks.table_html(rows, "Test split"),
        decks.table_html(confusion, f"Confusion matrix at {report.model.threshold}"),
        _roc_html(curves),
        decks.bar_chart_html(top, "Feature importance (total gain)", "gain"),
    ]


def identity(spec: TableSpec, metric: str) -> TaskIdentity:
    """The label and its classes, from the feature columns and their kinds."""
    features = dict(zip(spec.features, spec.feature_types(), strict=True))
    target = f"{spec.label} = {spec.label_classes[1]} (vs {spec.label_classes[0]})"
    inputs = f"{len(features)} features {json.dumps(features, sort_keys=True)}"
    return TaskIdentity("tabular", target, inputs, metric)


def run_record(
    training: TrainingReport, evaluation: EvaluationReport, params: XGBParams, spec: TableSpec
) -> RunRecord:
    first = training.restored_from_round + 1
    curves = {
        first + i: {"validation_auc": auc, "validation_logloss": loss}
        for i, (auc, loss) in enumerate(
            zip(training.validation_auc, training.validation_logloss, strict=True)
        )
    }
    return RunRecord(
        params={**{f"model.{k}": v for k, v in asdict(params).items()},
                "training.workers": training.workers, "data.source": spec.source,
                "data.label": spec.label, "data.rows": spec.rows},  # fmt: skip
        metrics={**evaluation.model.as_mlflow(),
                 **{f"baseline.{k}": v for k, v in evaluation.baseline.as_mlflow().items()}},
        curves=curves,
        documents={"encoding.json": asdict(spec)},
    )  # fmt: skip


def log_model(booster, spec: TableSpec, x: np.ndarray, registered_name: str | None):
    """The booster with MLflow's xgboost flavor, its signature, an input example and spec.json
    (the categorical encoding its inputs need)."""
    import mlflow
    from mlflow.models import infer_signature

    example = pd.DataFrame(x[:5], columns=spec.features)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/spec.json"
        with open(path, "w") as fh:  # read by MLflow below, before the folder goes
            fh.write(spec.to_json())
        return mlflow.xgboost.log_model(
            booster, name="model", model_format="json", registered_model_name=registered_name,
            signature=infer_signature(example, predict(booster, spec, x[:5])),
            input_example=example, extra_files=[path],
        )  # fmt: skip


def candidate(
    booster, spec: TableSpec, x: np.ndarray, y: np.ndarray, training: TrainingReport,
    evaluation: EvaluationReport, params: XGBParams, metric: str,
) -> Candidate:  # fmt: skip
    """The booster for the registry; the champion is scored on the same test rows `x`, `y`."""
    return Candidate(
        identity(spec, metric),
        run_record(training, evaluation, params, spec),
        lambda name: log_model(booster, spec, x, name),
        getattr(evaluation.model, metric),
        getattr(evaluation.baseline, metric),
        lambda uri: getattr(champion_metrics(uri, x, y, spec), metric),
        drift_columns(spec, x, y),
    )


def drift_columns(spec: TableSpec, x: np.ndarray, y: np.ndarray) -> dict[str, Column]:
    """Each feature (numeric: its values; categorical: its categories' counts) and the label."""

    def counts(codes: np.ndarray, names: list[str]) -> Column:
        found, n = np.unique(codes[np.isfinite(codes)].astype(int), return_counts=True)
        named = (names[c] if 0 <= c < len(names) else str(c) for c in found)
        return Column(counts=dict(zip(named, map(float, n), strict=True)))

    columns = {
        name: counts(x[:, i], spec.categories[name])
        if name in spec.categories
        else Column(values=x[:, i])
        for i, name in enumerate(spec.features)
    }
    columns["label"] = counts(np.asarray(y, dtype=np.float64), spec.label_classes)
    return columns
