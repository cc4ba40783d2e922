"""What the CLIP workload shows and records: the training report, decks, the MLflow run (rank 0
logs the curves into it, registration continues it), the model's task identity and flavor."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import mlflow
import numpy as np
import pyarrow as pa

from flyray import decks, registry
from flyray.clip.classifier import ClassifierParams, TrainedClassifier
from flyray.clip.embed import EmbeddingResult, matrix
from flyray.clip.evaluate import EvaluationReport, champion_metrics
from flyray.clip.images import Splits
from flyray.clip.pyfunc import log_pyfunc
from flyray.drift import Column
from flyray.raytrain import DistributedConfig
from flyray.registry import Candidate, RunRecord, TaskIdentity


@dataclass
class TrainingReport:
    workers: int
    epochs: list[int]
    train_loss: list[float]
    validation_loss: list[float]
    validation_accuracy: list[float]
    tracking_uri: str
    run_id: str  # the MLflow run rank 0 logged the curves to; registration continues it
    resumed_from_epoch: int = 0  # > 0: this attempt went on from a checkpoint

    @classmethod
    def of(cls, model: TrainedClassifier, run_id: str) -> TrainingReport:
        h = model.history
        return cls(
            model.workers, [e.epoch for e in h], [e.train_loss for e in h],
            [e.validation_loss for e in h], [e.validation_accuracy for e in h],
            registry.tracking_uri(), run_id, model.resumed_from_epoch,
        )  # fmt: skip


@contextmanager
def training_run(
    experiment: str, tags: dict, params: ClassifierParams, config: DistributedConfig, model: str
):
    """The MLflow run the classifier's training logs its curves to (rank 0, from Ray)."""
    registry.use_experiment(experiment)
    with mlflow.start_run(tags=tags) as run:
        mlflow.log_params({f"classifier.{k}": v for k, v in asdict(params).items()})
        mlflow.log_params({"training.workers": config.workers, "embedding_model": model})
        yield run


def embeddings_deck(result: EmbeddingResult, splits: Splits) -> list[str]:
    parts = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    counts = [
        {"class": label}
        | {name: int((t["label_idx"].to_numpy() == i).sum()) for name, t in parts.items()}
        for i, label in enumerate(splits.labels)
    ]
    facts = {k: v for k, v in asdict(result).items() if k != "rejected_files"}
    return [
        decks.table_html(facts, "Embedding step"),
        decks.table_html(counts, "Images per split"),
        decks.table_html([{"file": f} for f in result.rejected_files], "Rejected files"),
    ]


def training_deck(report: TrainingReport) -> list[str]:
    curves = {"train loss": report.train_loss, "validation loss": report.validation_loss}
    return [
        decks.line_chart_html(
            report.epochs, curves, "Classifier training curves", "epoch", "cross-entropy"
        )
    ]


def confusion_figure(confusion: list[list[int]], labels: list[str]):
    """A matplotlib heat map of the confusion matrix (rows true, columns predicted)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = decks.plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(confusion), display_labels=labels).plot(
        ax=ax, xticks_rotation=45, colorbar=False
    )
    ax.set_title("Confusion matrix (test split)")
    return fig


def evaluation_deck(result: EvaluationReport) -> list[str]:
    f1 = dict(zip(result.labels, result.per_class_f1, strict=True))
    return [
        decks.table_html([asdict(result.model), asdict(result.baseline)], "Held-out test split"),
        decks.figure_html(confusion_figure(result.confusion, result.labels)),
        decks.bar_chart_html(f1, "F1 per class", "F1"),
    ]


def identity(labels: list[str], embedding_model: str, metric: str) -> TaskIdentity:
    """The classes, from which embeddings."""
    return TaskIdentity(
        workload="clip",
        target=f"{len(labels)} classes {sorted(labels)}",
        inputs=f"CLIP embeddings of {embedding_model}",
        metric=metric,
    )


def run_record(evaluation: EvaluationReport, embeddings: EmbeddingResult) -> RunRecord:
    return RunRecord(
        metrics={**evaluation.model.as_mlflow(),
                 **{f"majority.{k}": v for k, v in evaluation.baseline.as_mlflow().items()},
                 "data.embedded": embeddings.embedded, "data.rejected": embeddings.rejected},
        documents={"embeddings.json": asdict(embeddings),
                   "confusion_matrix.json": {"labels": evaluation.labels,
                                             "confusion": evaluation.confusion}},
    )  # fmt: skip


def log_model(classifier: TrainedClassifier, example: np.ndarray, registered_name: str | None):
    """The classifier (and a local CLIP model) as an MLflow pyfunc."""
    with tempfile.TemporaryDirectory() as tmp:
        classifier.save(f"{tmp}/classifier")
        return log_pyfunc(f"{tmp}/classifier", classifier, example, registered_name)


def candidate(
    classifier: TrainedClassifier, test: pa.Table, evaluation: EvaluationReport,
    embeddings: EmbeddingResult, metric: str,
) -> Candidate:  # fmt: skip
    """The classifier for the registry, judged against the majority class; the champion is
    scored on the same test embeddings."""
    return Candidate(
        identity(classifier.labels, classifier.embedding_model, metric),
        run_record(evaluation, embeddings),
        lambda name: log_model(classifier, matrix(test), name),
        evaluation.model.get(metric),
        evaluation.baseline.get(metric),
        lambda uri: champion_metrics(uri, test).get(metric),
        {"class_balance": Column(counts=_label_counts(test))},
    )


def _label_counts(table: pa.Table) -> dict[str, float]:
    labels, counts = np.unique(
        np.asarray(table["label"].to_pylist(), dtype=str), return_counts=True
    )
    return {str(label): float(n) for label, n in zip(labels, counts, strict=True)}
