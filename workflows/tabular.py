"""The tabular job: parquet table -> validated splits -> XGBoost on Ray Train -> evaluation ->
MLflow registry behind the champion gate.

pyflyte run workflows/tabular.py xgboost_pipeline                          # bundled demo table
pyflyte run workflows/tabular.py xgboost_pipeline --source s3://bucket/avocado/ \
    --table '{"label": "type", "positive_label": "organic", "exclude": ["Date"]}'
"""

from __future__ import annotations

from typing import NamedTuple

from flytekit import LaunchPlan, StructuredDataset, workflow
from flytekit.types.directory import FlyteDirectory

import images
from flyray.raytrain import DistributedConfig
from flyray.registry import Registration, RegistryConfig
from flyray.tabular.data import TableConfig, TableSpec
from flyray.tabular.report import EvaluationReport
from flyray.tabular.train import TrainingReport, XGBParams
from tasks.recipe import recipe_task
from tasks.tabular import (
    evaluate_xgboost,
    prepare_table,
    register_xgboost,
    resolve_table,
    train_xgboost,
)

DEFAULT_TRAINING = DistributedConfig(checkpoint_every=25)
DEFAULT_REGISTRATION = RegistryConfig("flyray-xgboost", "flyray-tabular", "auc")


class XGBoostOutputs(NamedTuple):
    model: FlyteDirectory
    spec: TableSpec
    test: StructuredDataset  # the held-out rows, encoded as the model reads them
    training: TrainingReport
    evaluation: EvaluationReport
    registration: Registration


@workflow
def xgboost_pipeline(
    source: str = "",
    table: TableConfig = TableConfig(),
    params: XGBParams = XGBParams(),
    training: DistributedConfig = DEFAULT_TRAINING,
    registration: RegistryConfig = DEFAULT_REGISTRATION,
) -> XGBoostOutputs:
    """Binary XGBoost classifier from parquet (a file, directory or glob, local or s3://; empty:
    scikit-learn's breast-cancer table), evaluated on a held-out split and registered."""
    recipe = xgboost_recipe(**locals())  # the inputs, recorded with the version (tasks/recipe.py)
    src = resolve_table(source=source, label=table.label)
    data = prepare_table(source=src.source, fingerprint=src.fingerprint, config=table)
    trained = train_xgboost(
        train=data.train, validation=data.validation, spec=data.spec, params=params,
        config=training,
    )  # fmt: skip
    evaluation = evaluate_xgboost(model=trained.model, test=data.test)
    registered = register_xgboost(
        model=trained.model, test=data.test, training=trained.report, evaluation=evaluation,
        params=params, config=registration, recipe=recipe,
    )  # fmt: skip
    return XGBoostOutputs(
        trained.model, data.spec, data.test, trained.report, evaluation, registered
    )


xgboost_recipe = recipe_task(xgboost_pipeline, images.tabular, "xgboost_recipe")
default_plan = LaunchPlan.get_or_create(xgboost_pipeline, name="xgboost_default")
