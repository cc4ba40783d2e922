"""The registered champion CNN scored on a challenger's test split, so that the champion gate
compares two accuracies measured on the same images."""

from __future__ import annotations

import tempfile

import mlflow

from flyray.vision.data import ImageSet
from flyray.vision.train import evaluate


def champion_accuracy(model_uri: str, test: ImageSet) -> float:
    """Test accuracy of the registered Keras model at `model_uri` (tensorflow flavor) on `test`,
    by the same `evaluate` as the challenger's."""
    with tempfile.TemporaryDirectory() as tmp:
        model = mlflow.tensorflow.load_model(model_uri, dst_path=tmp)
    shape, classes = tuple(model.input_shape[1:]), model.output_shape[-1]
    if shape != test.images.shape[1:]:
        raise ValueError(
            f"champion {model_uri} takes images of shape {shape}, the test split has "
            f"{test.images.shape[1:]}"
        )
    if classes != len(test.class_names):
        raise ValueError(
            f"champion {model_uri} predicts {classes} classes, the test split has "
            f"{len(test.class_names)} ({test.class_names})"
        )
    return evaluate(model, test)[0]
