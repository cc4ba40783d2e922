"""FunkSVD as an MLflow pyfunc: user ids in, top-N items out (or scores for user/item pairs).

model = mlflow.pyfunc.load_model("models:/flyray-funksvd@champion")
model.predict(pd.DataFrame({"user_id": [42, 43]}), params={"n": 10})      # top-N
model.predict(pd.DataFrame({"user_id": [42], "item_id": [1001]}))         # pair scores
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

import flyray
from flyray.recsys.funksvd import FunkSVD


class FunkSVDPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model = FunkSVD.load(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        if "user_id" not in model_input.columns:
            raise ValueError("input needs a user_id column (and item_id to score pairs)")
        users = model_input["user_id"].to_numpy(np.int64)
        if "item_id" in model_input.columns and model_input["item_id"].notna().all():
            items = model_input["item_id"].to_numpy(np.int64)
            return pd.DataFrame(
                {
                    "user_id": users,
                    "rank": 0,
                    "item_id": items,
                    "score": self.model.predict(users, items),
                }  # fmt: skip
            )
        n = int((params or {}).get("n", 10))
        return self.model.recommend(users, n=n)


def log_pyfunc(model: FunkSVD, model_dir: str, registered_name: str | None = None):
    """Log the model (saved at model_dir) as a pyfunc with signature and input example."""
    example = pd.DataFrame({"user_id": model.user_ids[:3].astype(np.int64)})
    signature = ModelSignature(
        inputs=Schema([ColSpec("long", "user_id"), ColSpec("long", "item_id", required=False)]),
        outputs=Schema(
            [
                ColSpec("long", "user_id"),
                ColSpec("long", "rank"),
                ColSpec("long", "item_id"),
                ColSpec("float", "score"),
            ]  # fmt: skip
        ),
        params=ParamSchema([ParamSpec("n", "long", 10)]),
    )
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=FunkSVDPyfunc(),
        artifacts={"model": model_dir},
        signature=signature,
        input_example=example,
        code_paths=[str(Path(flyray.__file__).parent)],
        registered_model_name=registered_name,
    )
