"""Held-out evaluation by batch inference (Ray Data actors holding the classifier).

Precision, recall and F1 (macro and micro), accuracy and the confusion matrix come from
scikit-learn; the same metrics for the majority-class baseline give the champion gate a floor.
`champion_metrics` scores the registered champion on a challenger's test split, so that the gate
compares two numbers measured on the same rows.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from mlflow.models import Model

from flyray.clip.classifier import TrainedClassifier
from flyray.clip.embed import matrix
from flyray.raytrain import require_ray


class _Predict:
    """Ray Data UDF: the classifier is fetched once per actor."""

    def __init__(self, model_ref):
        self.model: TrainedClassifier = ray.get(model_ref)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        probs = self.model.predict_proba(matrix(batch))
        return {
            "label_idx": batch["label_idx"].to_numpy(),
            "prediction": probs.argmax(1),
            "score": probs.max(1),
        }


def batch_predict(
    model: TrainedClassifier, table: pa.Table, batch_size: int = 1024, max_actors: int = 0
) -> pa.Table:
    """label_idx, prediction, score for each (embedding, label_idx) row."""
    require_ray()
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    size = max(1, min(max_actors or cpus, cpus, table.num_rows // batch_size + 1))
    ds = ray.data.from_arrow(table.select(["embedding", "label_idx"]))
    out = ds.map_batches(
        _Predict,
        fn_constructor_kwargs={"model_ref": ray.put(model)},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=size),
    )
    return pa.concat_tables(ray.get(list(out.to_arrow_refs())))


@dataclass
class ClassificationMetrics:
    model: str
    rows: int
    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    precision_micro: float
    recall_micro: float
    f1_micro: float

    def get(self, metric: str) -> float:
        return float(getattr(self, metric))

    def as_mlflow(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if k not in ("model", "rows")}


@dataclass
class EvaluationReport:
    labels: list[str]
    model: ClassificationMetrics
    baseline: ClassificationMetrics  # always predicts the training split's most common class
    confusion: list[list[int]]  # rows: true class, columns: predicted, in label order
    per_class_f1: list[float]


def classification_metrics(
    name: str, y_true: np.ndarray, y_pred: np.ndarray, n_classes: int
) -> ClassificationMetrics:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    classes = list(range(n_classes))
    scores = {}
    for avg in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=classes, average=avg, zero_division=0
        )
        scores.update(
            {f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)}
        )
    return ClassificationMetrics(name, len(y_true), float(accuracy_score(y_true, y_pred)), **scores)


def evaluate(
    model: TrainedClassifier, test: pa.Table, train_label_idx: np.ndarray, batch_size: int = 1024
) -> EvaluationReport:
    """Metrics of the model on the test rows beside the majority-class baseline."""
    from sklearn.metrics import confusion_matrix, f1_score

    if test.num_rows == 0:
        raise ValueError("the test split is empty: nothing to evaluate")
    predicted = batch_predict(model, test, batch_size)
    y_true = predicted["label_idx"].to_numpy()
    y_pred = predicted["prediction"].to_numpy()
    n = len(model.labels)
    majority = np.bincount(train_label_idx, minlength=n).argmax()
    classes = list(range(n))
    return EvaluationReport(
        labels=list(model.labels),
        model=classification_metrics("classifier", y_true, y_pred, n),
        baseline=classification_metrics("majority", y_true, np.full_like(y_true, majority), n),
        confusion=confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        per_class_f1=f1_score(
            y_true, y_pred, labels=classes, average=None, zero_division=0
        ).tolist(),
    )


def champion_metrics(model_uri: str, test: pa.Table) -> ClassificationMetrics:
    """The registered classifier at `model_uri` (a pyfunc of `flyray.clip.pyfunc.log_pyfunc`) on
    a challenger's test split, its rows' label_idx re-mapped from their label to the champion's
    label map. Only the classifier is downloaded, not the CLIP model logged beside it."""
    artifact = Model.load(model_uri).flavors["python_function"]["artifacts"]["classifier"]["path"]
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model_uri}/{artifact}", dst_path=tmp
        )
        champion = TrainedClassifier.load(local)
    labels = sorted(set(test["label"].to_pylist()))
    if labels != sorted(champion.labels):
        raise ValueError(
            f"label sets differ: champion {model_uri} has {sorted(champion.labels)}, the test "
            f"split {labels}"
        )
    idx = pc.index_in(test["label"], value_set=pa.array(champion.labels)).cast(pa.int64())
    test = test.set_column(test.schema.get_field_index("label_idx"), "label_idx", idx)
    # The baseline part of the evaluation (from the "training" labels passed) is not used.
    return evaluate(champion, test, idx.to_numpy()).model
