"""Flyte tasks of the CNN benchmark: data, the two training runs, the report, the registry."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import NamedTuple

import mlflow
import numpy as np
from flytekit import Cache, Resources, StructuredDataset, current_context, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

import images
from flyray import registry, storage
from flyray.registry import Registration, champion_gate
from flyray.vision.data import (
    CIFAR_META,
    CIFAR_TEST_BATCH,
    CIFAR_TRAIN_BATCHES,
    IMAGE_SUFFIXES,
    DataSummary,
    prepare,
    read_parquet,
)
from flyray.vision.model import CNNParams
from flyray.vision.report import Comparison, build_report
from flyray.vision.train import MODEL_FILE, DistributedConfig, RunReport
from flyray.vision.train import train_baseline as run_baseline
from flyray.vision.train import train_distributed as run_distributed
from tasks import decks
from tasks.runtime import (
    dataset_uri,
    export_s3_secrets,
    new_output_dir,
    ray_job,
    ray_setting,
    s3_secret_requests,
    setup_logging,
    transient_retries,
)

# The baseline pod gets one Ray worker's budget (same variables as tasks/runtime.py).
BASELINE_RESOURCES = Resources(
    cpu=ray_setting("FLYRAY_RAY_WORKER_CPU"), mem=ray_setting("FLYRAY_RAY_WORKER_MEM")
)


@dataclass
class CNNRegistryConfig:
    model_name: str = "flyray-cnn"
    experiment: str = "flyray-image-classification"
    metric: str = "accuracy"  # the gate's metric (test accuracy), higher is better


class PreparedImages(NamedTuple):
    train: StructuredDataset
    test: StructuredDataset
    summary: DataSummary


class DistributedOutputs(NamedTuple):
    model: FlyteDirectory
    report: RunReport


class ReportOutputs(NamedTuple):
    report: FlyteFile
    comparison: Comparison


@task(container_image=images.image, retries=1, secret_requests=s3_secret_requests())
@transient_retries
def resolve_image_source(source: str) -> str:
    """A fingerprint of the source's content, so that prepare_images' cache follows content."""
    export_s3_secrets()
    if not source:
        import sklearn

        return f"sklearn-digits-{sklearn.__version__}"
    suffixes = IMAGE_SUFFIXES + CIFAR_TRAIN_BATCHES + (CIFAR_TEST_BATCH, CIFAR_META)
    return storage.fingerprint(storage.list_input_files(source, suffixes))


@task(
    container_image=images.image,
    cache=Cache(version="vision-data-1", serialize=True),
    retries=1,
    secret_requests=s3_secret_requests(),
    enable_deck=True,
)
@transient_retries
def prepare_images(
    source: str, fingerprint: str, image_size: int, test_fraction: float, seed: int
) -> PreparedImages:
    """CIFAR-10 batches, an image folder or the digits demo as train/test parquet."""
    setup_logging()
    export_s3_secrets()
    out = new_output_dir()
    summary = prepare(source, out, image_size, test_fraction, seed)
    sample = read_parquet(storage.join(out, "test"))
    decks.publish(
        "data",
        decks.table_html(
            {k: v for k, v in asdict(summary).items() if k != "train_class_counts"}, "Data"
        ),
        decks.bar_chart_html(
            dict(zip(summary.class_names, map(float, summary.train_class_counts), strict=True)),
            "Training images per class",
            "images",
        ),
        _sample_grid(sample.images[:16], [summary.class_names[i] for i in sample.labels[:16]]),
    )
    return PreparedImages(
        StructuredDataset(uri=storage.join(out, "train")),
        StructuredDataset(uri=storage.join(out, "test")),
        summary,
    )


def _sample_grid(pictures: np.ndarray, titles: list[str]) -> str:
    import matplotlib.pyplot as plt  # after tasks.decks, which selects the Agg backend

    fig, axes = plt.subplots(2, 8, figsize=(8, 2.4))
    for ax, picture, title in zip(axes.flat, pictures, titles, strict=False):
        ax.imshow(picture)
        ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    return decks.figure_html(fig)


# Timings are measurements: neither training task is cached, a rerun measures again.
@task(
    container_image=images.image,
    requests=BASELINE_RESOURCES,
    limits=BASELINE_RESOURCES,
    retries=1,
    secret_requests=s3_secret_requests(),
)
@transient_retries
def train_baseline(
    train: StructuredDataset, test: StructuredDataset, params: CNNParams, threads: int
) -> RunReport:
    """The CNN in one process (threads 0: every CPU of this pod)."""
    setup_logging()
    export_s3_secrets()
    return run_baseline(dataset_uri(train), dataset_uri(test), params, threads)


@task(
    container_image=images.image,
    task_config=ray_job(),
    retries=1,
    secret_requests=s3_secret_requests(),
)
@transient_retries
def train_distributed(
    train: StructuredDataset, test: StructuredDataset, params: CNNParams, config: DistributedConfig
) -> DistributedOutputs:
    """The same CNN on Ray Train (TensorflowTrainer, MultiWorkerMirroredStrategy)."""
    setup_logging()
    export_s3_secrets()
    if not config.storage_uri:  # shared storage for the workers' checkpoints
        config = DistributedConfig(
            **{**asdict(config), "storage_uri": storage.join(new_output_dir(), "ray-train")}
        )
    model_dir = tempfile.mkdtemp(prefix="cnn-model-")
    report = run_distributed(dataset_uri(train), dataset_uri(test), params, config, model_dir)
    return DistributedOutputs(FlyteDirectory(model_dir), report)


@task(container_image=images.image, retries=1, enable_deck=True)
def compare_runs(
    baseline: RunReport,
    distributed: RunReport,
    summary: DataSummary,
    params: CNNParams,
    config: DistributedConfig,
) -> ReportOutputs:
    """comparison.json and a deck: per-epoch curves, times and accuracies side by side."""
    setup = {
        "dataset": summary.kind,
        "source": summary.source or "sklearn digits (demo)",
        "classes": len(summary.class_names),
        "image_shape": summary.image_shape,
        "train_examples": summary.train_examples,
        "test_examples": summary.test_examples,
        "params": asdict(params),
        "distributed": asdict(config),
    }
    report = build_report(baseline, distributed, setup)
    comparison = Comparison(**report["comparison"])
    path = os.path.join(tempfile.mkdtemp(), "comparison.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    label = f"ray ({distributed.workers} workers)"
    epochs = list(range(1, len(baseline.epoch_seconds) + 1))
    decks.publish(
        "comparison",
        f"<p>{comparison.note}</p>",
        decks.table_html(asdict(comparison), "Baseline vs Ray Train"),
        decks.grouped_bar_html(
            {
                "baseline": {
                    "training s": baseline.training_time_seconds,
                    "epochs s": sum(baseline.epoch_seconds),
                },
                label: {
                    "training s": distributed.training_time_seconds,
                    "epochs s": sum(distributed.epoch_seconds),
                },
            },  # fmt: skip
            "Training time",
            "seconds",
        ),  # fmt: skip
        decks.line_chart_html(
            epochs,
            {"baseline": baseline.epoch_seconds, label: distributed.epoch_seconds},
            "Seconds per epoch",
            "epoch",
            "seconds",
        ),  # fmt: skip
        decks.line_chart_html(
            epochs,
            {"baseline": baseline.train_accuracy, label: distributed.train_accuracy},
            "Training accuracy",
            "epoch",
            "accuracy",
        ),  # fmt: skip
        decks.bar_chart_html(
            {"baseline": baseline.test_accuracy, label: distributed.test_accuracy},
            "Test accuracy",
            "accuracy",
        ),  # fmt: skip
    )
    return ReportOutputs(FlyteFile(path), comparison)


@task(
    container_image=images.image,
    retries=2,
    secret_requests=s3_secret_requests(),
    enable_deck=True,
)
@transient_retries
def register_cnn(
    model: FlyteDirectory,
    report: FlyteFile,
    comparison: Comparison,
    distributed: RunReport,
    summary: DataSummary,
    params: CNNParams,
    config: CNNRegistryConfig,
) -> Registration:
    """The distributed model in MLflow (tensorflow flavor), the comparison as metrics, then the
    shared champion gate on test accuracy against always predicting the majority class."""
    import tf_keras as keras

    setup_logging()
    export_s3_secrets()
    registry.use_experiment(config.experiment)
    execution = current_context().execution_id
    local = os.path.join(model.download(), MODEL_FILE)
    cnn = keras.models.load_model(local)
    example = np.zeros((2, *summary.image_shape), np.float32)
    with mlflow.start_run(
        tags={
            "flyte.execution_id": execution.name,
            "flyte.project": execution.project,
            "flyte.domain": execution.domain,
            "workload": "image_classification",
        }  # fmt: skip
    ) as run:
        mlflow.log_params({f"model.{k}": v for k, v in asdict(params).items()})
        mlflow.log_params({"data.kind": summary.kind, "data.source": summary.source or "digits",
                           "ray.workers": distributed.workers})  # fmt: skip
        for epoch, (loss, acc, secs) in enumerate(
            zip(distributed.train_loss, distributed.train_accuracy, distributed.epoch_seconds,
                strict=True), start=1,
        ):  # fmt: skip
            mlflow.log_metrics({"train_loss": loss, "train_accuracy": acc, "epoch_seconds": secs},
                               step=epoch)  # fmt: skip
        mlflow.log_metrics(
            {
                registry.metric_key(config.metric): comparison.distributed_test_accuracy,
                "baseline.test_accuracy": comparison.baseline_test_accuracy,
                "majority_class.accuracy": summary.majority_test_accuracy,
                "speedup": comparison.speedup,
                "efficiency": comparison.efficiency,
                "epoch_speedup": comparison.epoch_speedup,
                "baseline.training_time_seconds": comparison.baseline_seconds,
                "ray.training_time_seconds": comparison.distributed_seconds,
            }  # fmt: skip
        )
        mlflow.log_artifact(report.download(), "report")
        info = mlflow.tensorflow.log_model(
            cnn, name="model", input_example=example, registered_model_name=config.model_name
        )
        version = str(info.registered_model_version)
        decision = champion_gate(
            config.model_name, version, config.metric, comparison.distributed_test_accuracy,
            baseline_value=summary.majority_test_accuracy,
        )  # fmt: skip
        mlflow.set_tags({"promotion": "champion" if decision.promoted else "rejected",
                         "promotion_reason": decision.reason})  # fmt: skip
    decks.publish("registry", decks.table_html(asdict(decision), "Champion gate"))
    return Registration(registry.tracking_uri(), run.info.run_id, decision)
