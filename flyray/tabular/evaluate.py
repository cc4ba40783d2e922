"""Held-out metrics of a binary classifier's scores (scikit-learn's implementations)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm


@dataclass
class BinaryMetrics:
    model: str
    rows: int
    auc: float
    logloss: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    confusion: list[list[int]]  # [[tn, fp], [fn, tp]] at `threshold`
    threshold: float = 0.5

    def as_mlflow(self) -> dict[str, float]:
        (tn, fp), (fn, tp) = self.confusion
        return {
            "auc": self.auc, "logloss": self.logloss, "accuracy": self.accuracy,
            "precision": self.precision, "recall": self.recall, "f1": self.f1,
            "tn": tn, "fp": fp, "fn": fn, "tp": tp,
        }  # fmt: skip


def evaluate(scores: np.ndarray, y: np.ndarray, model: str, threshold: float = 0.5):
    """Metrics of probabilities `scores` against 0/1 labels `y`; both classes must be present."""
    if len(np.unique(y)) != 2:
        raise ValueError(f"evaluation needs both classes in the labels; got {np.unique(y)}")
    predicted = (scores >= threshold).astype(np.int8)
    clipped = np.clip(scores.astype(np.float64), 1e-15, 1 - 1e-15)
    return BinaryMetrics(
        model=model,
        rows=len(y),
        auc=float(skm.roc_auc_score(y, scores)),
        logloss=float(skm.log_loss(y, clipped, labels=[0, 1])),
        accuracy=float(skm.accuracy_score(y, predicted)),
        precision=float(skm.precision_score(y, predicted, zero_division=0)),
        recall=float(skm.recall_score(y, predicted, zero_division=0)),
        f1=float(skm.f1_score(y, predicted, zero_division=0)),
        confusion=skm.confusion_matrix(y, predicted, labels=[0, 1]).tolist(),
        threshold=threshold,
    )


def prior_scores(positive_rate: float, rows: int) -> np.ndarray:
    """The baseline: every row scored with the training positive rate (AUC 0.5, the prior's
    logloss). A model that does not beat it has learned nothing from the features."""
    return np.full(rows, positive_rate, dtype=np.float64)


def roc_points(scores: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) of the ROC curve, for plotting."""
    fpr, tpr, _ = skm.roc_curve(y, scores, drop_intermediate=True)
    return fpr.tolist(), tpr.tolist()
