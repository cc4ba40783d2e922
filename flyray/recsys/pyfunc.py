"""The recommender as an MLflow pyfunc: user ids in, top-N items out (or user/item pair scores).

model = mlflow.pyfunc.load_model("models:/flyray-funksvd@champion")
model.predict(pd.DataFrame({"user_id": [42, 43]}), params={"n": 10})      # top-N
model.predict(pd.DataFrame({"user_id": [42], "item_id": [1001]}))         # pair scores

Logged as MLflow models-from-code: the model is built by running `pyfunc_model.py` (shipped with
the model, with the flyray package as its code path) and reads its factors from the artifact
files (model.npz, meta.json), so loading unpickles nothing and works with
MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false. The scorer is flyray.recsys.model.FactorModel, which
every trainer (FunkSVD, iALS) produces, so one pyfunc serves them all.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

import flyray
from flyray.recsys.model import FactorModel

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("long", "user_id"), ColSpec("long", "item_id", required=False)]),
    outputs=Schema(
        [
            ColSpec("long", "user_id"),
            ColSpec("long", "rank"),
            ColSpec("long", "item_id"),
            ColSpec("float", "score"),
        ]
    ),  # fmt: skip
    params=ParamSchema([ParamSpec("n", "long", 10)]),
)


class FactorPyfunc(mlflow.pyfunc.PythonModel):
    """Top-N and pair scores of a factor model, r_ui = mu + b_u + b_i + p_u . q_i (biases zero
    for an unbiased model), from the `model` artifact folder (the key that champion scoring,
    flyray.recsys.evaluate, reads too)."""

    def load_context(self, context) -> None:
        self.model = FactorModel.load(context.artifacts["model"])

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
                    "score": self.model.score(users, items),
                }  # fmt: skip
            )
        n = int((params or {}).get("n", 10))
        return self.model.recommend(users, n=n)


def log_pyfunc(model, model_dir: str, registered_name: str | None = None):
    """Log the factor model saved at model_dir (its files as the artifact) as a models-from-code
    pyfunc with signature and input example; `model` gives the example's user ids."""
    example = pd.DataFrame({"user_id": np.asarray(model.user_ids[:3], np.int64)})
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts={"model": model_dir},
        signature=SIGNATURE,
        input_example=example,
        code_paths=[str(Path(flyray.__file__).parent)],
        registered_model_name=registered_name,
    )
