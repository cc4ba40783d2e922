"""The CLIP classifier as an MLflow pyfunc: images (or their embeddings) in, classes out.

model = mlflow.pyfunc.load_model("models:/flyray-clip@champion")
model.predict(pd.DataFrame({"image": [png_bytes, jpeg_bytes]}))        # encoded image bytes
model.predict(pd.DataFrame({"path": ["s3://bucket/dog.jpg"]}))           # files, local or s3://
model.predict(pd.DataFrame({"embedding": [vector]}))                    # CLIP embeddings
-> DataFrame label, score (the class's softmax probability)

The label map travels in the classifier's files, the embedding model with it: a local CLIP
directory is logged as an artifact, a hub id is recorded and loaded from the hub.

Logged as MLflow models-from-code: the model is built by running `pyfunc_model.py` (shipped with
the model, with the flyray package as its code path) and reads the classifier's files
(classifier.json, a torch state dict loaded with weights_only) and CLIP's safetensors, so
loading unpickles nothing and works with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
"""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema

import flyray
from flyray import storage
from flyray.clip.classifier import TrainedClassifier
from flyray.clip.embed import ClipEmbedder, local_model
from flyray.images import decode

INPUTS = ("image", "path", "embedding")
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


class ClipPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.classifier = TrainedClassifier.load(context.artifacts["classifier"])
        self.clip_source = context.artifacts.get("clip") or self.classifier.embedding_model
        self.embedder: ClipEmbedder | None = None  # loaded on the first image input

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        column = next((c for c in INPUTS if c in model_input.columns), None)
        if column is None:
            raise ValueError(
                f"input needs one of the columns {INPUTS}, got {list(model_input.columns)}"
            )
        values = list(model_input[column])
        if column == "embedding":
            x = np.stack([np.asarray(v, np.float32) for v in values])
        else:
            x = self._embed([self._read(column, v, i) for i, v in enumerate(values)])
        probs = self.classifier.predict_proba(x)
        labels = np.asarray(self.classifier.labels, dtype=object)
        return pd.DataFrame({"label": labels[probs.argmax(1)], "score": probs.max(1)})

    def _read(self, column: str, value, row: int):
        try:
            if column == "path":
                fs, path = storage.filesystem(value)
                with fs.open_input_stream(path) as fh:
                    value = fh.read()
            elif isinstance(value, str):  # base64, as JSON carries bytes
                value = base64.b64decode(value)
            return decode(value)
        except (ValueError, OSError) as exc:
            raise ValueError(f"row {row} ({column}): cannot read the image: {exc}") from exc

    def _embed(self, images: list) -> np.ndarray:
        if self.embedder is None:
            self.embedder = ClipEmbedder(self.clip_source)
        return self.embedder.embed(images)


def log_pyfunc(
    classifier_dir: str,
    model: TrainedClassifier,
    example: np.ndarray,
    registered_name: str | None = None,
):
    """Log the classifier (saved at classifier_dir) and, when local, its CLIP model."""
    artifacts = {"classifier": classifier_dir}
    clip = model.embedding_model
    if storage.is_s3(clip) or Path(clip).is_dir():
        artifacts["clip"] = local_model(clip)
    signature = ModelSignature(
        inputs=Schema(
            [
                ColSpec("binary", "image", required=False),
                ColSpec("string", "path", required=False),
                ColSpec(Array("double"), "embedding", required=False),
            ]
        ),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
    )
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts=artifacts,
        signature=signature,
        input_example=pd.DataFrame({"embedding": [row.tolist() for row in example[:2]]}),
        code_paths=[str(Path(flyray.__file__).parent)],
        registered_model_name=registered_name,
    )
