"""CNN benchmark: the same Keras CNN trained in one process and on Ray Train, then compared.

pyflyte run workflows/image_classification.py cnn_benchmark                      # digits demo
pyflyte run workflows/image_classification.py cnn_benchmark --source data/cifar-10-batches-py
"""

from __future__ import annotations

from typing import NamedTuple

from flytekit import LaunchPlan, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

import images
from flyray.raytrain import DistributedConfig
from flyray.registry import Registration, RegistryConfig
from flyray.vision.model import CNNParams
from flyray.vision.report import Comparison
from tasks.recipe import recipe_task
from tasks.vision import (
    compare_runs,
    prepare_images,
    register_cnn,
    resolve_image_source,
    train_baseline,
    train_distributed,
)

# Ray Train workers of 1 CPU each; fixed size, so that the speedup compares like with like.
DEFAULT_TRAINING = DistributedConfig(workers=2, min_workers=0, max_failures=1)
DEFAULT_REGISTRATION = RegistryConfig("flyray-cnn", "flyray-image-classification", "accuracy")


class BenchmarkOutputs(NamedTuple):
    report: FlyteFile
    comparison: Comparison
    model: FlyteDirectory
    registration: Registration


@workflow
def cnn_benchmark(
    source: str = "",
    image_size: int = 32,
    test_fraction: float = 0.2,
    params: CNNParams = CNNParams(),
    training: DistributedConfig = DEFAULT_TRAINING,
    baseline_threads: int = 0,
    registration: RegistryConfig = DEFAULT_REGISTRATION,
) -> BenchmarkOutputs:
    """Images (CIFAR-10 batches, an image folder, or "" for the digits demo) -> baseline run ->
    Ray Train run -> comparison.json and deck -> the Ray model in MLflow behind the champion
    gate."""
    recipe = cnn_recipe(**locals())  # the inputs, recorded with the version (tasks/recipe.py)
    fingerprint = resolve_image_source(source=source)
    data = prepare_images(
        source=source, fingerprint=fingerprint, image_size=image_size,
        test_fraction=test_fraction, seed=params.seed,
    )  # fmt: skip
    baseline = train_baseline(
        train=data.train, test=data.test, params=params, threads=baseline_threads
    )
    ray_run = train_distributed(train=data.train, test=data.test, params=params, config=training)
    baseline >> ray_run.report  # one after the other: on a shared node they would slow each other
    report = compare_runs(
        baseline=baseline, distributed=ray_run.report, summary=data.summary, params=params,
        config=training,
    )  # fmt: skip
    registered = register_cnn(
        model=ray_run.model, test=data.test, report=report.report, comparison=report.comparison,
        distributed=ray_run.report, summary=data.summary, params=params, config=registration,
        recipe=recipe,
    )  # fmt: skip
    return BenchmarkOutputs(report.report, report.comparison, ray_run.model, registered)


cnn_recipe = recipe_task(cnn_benchmark, images.image, "cnn_recipe")
default_plan = LaunchPlan.get_or_create(cnn_benchmark, name="cnn_benchmark_default")
