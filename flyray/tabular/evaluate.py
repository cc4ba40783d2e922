"""Held-out metrics of a binary classifier's scores (scikit-learn's implementations), and the
registered champion scored on a challenger's test split (`champion_metrics`)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import xgboost as xgb
from sklearn import metrics as skm

from flyray.tabular.data import TableSpec
from flyray.tabular.train import predict


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


def recode(x: np.ndarray, from_spec: TableSpec, to_spec: TableSpec) -> np.ndarray:
    """Rows encoded by `from_spec` as `to_spec` encodes them: its column order, its category
    codes (NaN for a category it never saw). Each spec's vocabulary comes from its own data, so
    the same code can name different categories."""
    only_from = [f for f in from_spec.features if f not in to_spec.features]
    only_to = [f for f in to_spec.features if f not in from_spec.features]
    if only_from or only_to:
        raise ValueError(
            f"feature columns differ: {only_from} only in the data's encoding, {only_to} only in "
            "the model's"
        )
    kinds = [
        f for f in to_spec.features if (f in from_spec.categories) != (f in to_spec.categories)
    ]
    if kinds:
        raise ValueError(f"columns {kinds} are categorical in one encoding, numeric in the other")
    out = np.asarray(x, np.float32)[:, [from_spec.features.index(f) for f in to_spec.features]]
    for j, name in enumerate(to_spec.features):
        if name in to_spec.categories:
            codes = pd.Index(to_spec.categories[name]).get_indexer(from_spec.categories[name])
            codes = np.where(codes >= 0, codes, np.nan).astype(np.float32)
            col = out[:, j]  # a view: filled in place
            known = ~np.isnan(col)
            col[known] = codes[col[known].astype(np.int64)]
    return out


def load_registered(model_uri: str) -> tuple[xgb.Booster, TableSpec]:
    """The booster logged at `model_uri` (xgboost flavor) and the encoding its inputs need
    (spec.json, logged beside it as an extra file)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        booster = mlflow.xgboost.load_model(local)
        spec = TableSpec.from_json(Path(local, "extra_files", "spec.json").read_text())
    return booster, spec


def champion_metrics(
    model_uri: str, x: np.ndarray, y: np.ndarray, spec: TableSpec
) -> BinaryMetrics:
    """The registered booster at `model_uri` (xgboost flavor, spec.json as an extra file) scored
    on a challenger's test rows `x`, `y` encoded by the challenger's `spec`: the same rows and
    metrics as the challenger's evaluation."""
    booster, champion = load_registered(model_uri)
    if champion.label_classes != spec.label_classes:
        raise ValueError(
            f"label classes differ: the champion's {champion.label_classes}, the test split's "
            f"{spec.label_classes}"
        )
    return evaluate(predict(booster, champion, recode(x, spec, champion)), y, "champion")
