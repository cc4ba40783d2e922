"""CNN benchmark: the same Keras CNN trained in one process and on Ray Train, then compared.

pyflyte run workflows/image_classification.py cnn_benchmark                      # digits demo
pyflyte run workflows/image_classification.py cnn_benchmark --source data/cifar-10-batches-py
"""

from __future__ import annotations

from typing import NamedTuple

from flytekit import LaunchPlan, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from flyray.registry import GateDecision
from flyray.vision.model import CNNParams
from flyray.vision.report import Comparison
from flyray.vision.train import DistributedConfig
from tasks.vision import (
    CNNRegistryConfig,
    compare_runs,
    prepare_images,
    register_cnn,
    resolve_image_source,
    train_baseline,
    train_distributed,
)

DEFAULT_PARAMS = CNNParams()
DEFAULT_DISTRIBUTED = DistributedConfig()
DEFAULT_REGISTRY = CNNRegistryConfig()


class BenchmarkOutputs(NamedTuple):
    report: FlyteFile
    comparison: Comparison
    model: FlyteDirectory
    decision: GateDecision


@workflow
def cnn_benchmark(
    source: str = "",
    image_size: int = 32,
    test_fraction: float = 0.2,
    params: CNNParams = DEFAULT_PARAMS,
    distributed: DistributedConfig = DEFAULT_DISTRIBUTED,
    baseline_threads: int = 0,
    registry_config: CNNRegistryConfig = DEFAULT_REGISTRY,
) -> BenchmarkOutputs:
    """Images (CIFAR-10 batches, an image folder, or "" for the digits demo) -> baseline run ->
    Ray Train run -> comparison.json and deck -> the Ray model in MLflow behind the champion
    gate."""
    fingerprint = resolve_image_source(source=source)
    data = prepare_images(
        source=source,
        fingerprint=fingerprint,
        image_size=image_size,
        test_fraction=test_fraction,
        seed=params.seed,
    )
    baseline = train_baseline(
        train=data.train, test=data.test, params=params, threads=baseline_threads
    )
    ray_run = train_distributed(train=data.train, test=data.test, params=params, config=distributed)
    baseline >> ray_run.report  # one after the other: on a shared node they would slow each other
    report = compare_runs(
        baseline=baseline,
        distributed=ray_run.report,
        summary=data.summary,
        params=params,
        config=distributed,
    )
    registration = register_cnn(
        model=ray_run.model,
        report=report.report,
        comparison=report.comparison,
        distributed=ray_run.report,
        summary=data.summary,
        params=params,
        config=registry_config,
    )
    return BenchmarkOutputs(report.report, report.comparison, ray_run.model, registration.decision)


default_plan = LaunchPlan.get_or_create(cnn_benchmark, name="cnn_benchmark_default")
