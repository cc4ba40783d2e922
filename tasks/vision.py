"""Flyte tasks of the CNN benchmark: data, the two training runs, the report, the registry."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, replace
from typing import NamedTuple

from flytekit import Resources, StructuredDataset
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

import images
from flyray import storage
from flyray.images import IMAGE_SUFFIXES
from flyray.lineage import DataInput
from flyray.raytrain import DistributedConfig
from flyray.registry import Registration, RegistryConfig, metric_key
from flyray.vision import report as cnn
from flyray.vision.data import (
    CIFAR_META,
    CIFAR_TEST_BATCH,
    CIFAR_TRAIN_BATCHES,
    DataSummary,
    prepare,
    read_parquet,
)
from flyray.vision.model import CNNParams
from flyray.vision.report import Comparison, build_report, write_report
from flyray.vision.train import MODEL_FILE, RunReport
from flyray.vision.train import train_baseline as run_baseline
from flyray.vision.train import train_distributed as run_distributed
from tasks.deployment import current
from tasks.outputs import new_output_dir, publish, register, uri
from tasks.platform import flyray_task, minutes, sized_by_run

# GPUs per Ray worker pod of the CNN's training, read when registering (0: CPU only, so that the
# speedup compares like with like; with GPUs each Ray Train worker takes one).
WORKER_GPUS = current().cnn_worker_gpus
# The baseline pod gets one Ray worker's budget (same variables as the Ray pods).
BASELINE_RESOURCES = Resources(cpu=current().ray_worker_cpu, mem=current().ray_worker_mem)


class PreparedImages(NamedTuple):
    train: StructuredDataset
    test: StructuredDataset
    summary: DataSummary


class TrainOutputs(NamedTuple):
    model: FlyteDirectory
    report: RunReport


class ReportOutputs(NamedTuple):
    report: FlyteFile
    comparison: Comparison


@flyray_task(images.image, timeout=minutes(15))
def resolve_image_source(source: str) -> str:
    """A fingerprint of the source's content, so that prepare_images' cache follows content."""
    if not source:
        import sklearn

        return f"sklearn-digits-{sklearn.__version__}"
    suffixes = IMAGE_SUFFIXES + CIFAR_TRAIN_BATCHES + (CIFAR_TEST_BATCH, CIFAR_META)
    return storage.fingerprint(storage.list_input_files(source, suffixes))


@flyray_task(images.image, cache="vision-data-2", deck=True, timeout=minutes(60))
def prepare_images(
    source: str, fingerprint: str, image_size: int, test_fraction: float, seed: int
) -> PreparedImages:
    """CIFAR-10 batches, an image folder or the digits demo as train/test parquet."""
    out = new_output_dir()
    summary = replace(
        prepare(source, out, image_size, test_fraction, seed), fingerprint=fingerprint
    )
    publish("data", *cnn.data_deck(summary, read_parquet(storage.join(out, "test"))))
    train, test = (StructuredDataset(uri=storage.join(out, n)) for n in ("train", "test"))
    return PreparedImages(train, test, summary)


# Timings are measurements: neither training task is cached, a rerun measures again.
@flyray_task(images.image, resources=BASELINE_RESOURCES, timeout=minutes(180))
def train_baseline(
    train: StructuredDataset, test: StructuredDataset, params: CNNParams, threads: int
) -> RunReport:
    """The CNN in one process (threads 0: every CPU of this pod)."""
    return run_baseline(uri(train), uri(test), params, threads)


@flyray_task(images.image, ray=DistributedConfig(), worker_gpus=WORKER_GPUS, checkpoints="cnn",
             timeout=minutes(180))  # fmt: skip
def fit_cnn(
    train: StructuredDataset, test: StructuredDataset, params: CNNParams, config: DistributedConfig
) -> TrainOutputs:
    """The same CNN on Ray Train (TensorflowTrainer, MultiWorkerMirroredStrategy); a Flyte
    retry resumes from the failed attempt's last epoch checkpoint."""
    model_dir = tempfile.mkdtemp(prefix="cnn-model-")
    report = run_distributed(uri(train), uri(test), params, config, model_dir)
    return TrainOutputs(FlyteDirectory(model_dir), report)


train_distributed = sized_by_run(fit_cnn, "train_distributed", WORKER_GPUS)


@flyray_task(images.image, storage=False, deck=True, timeout=minutes(10))
def compare_runs(
    baseline: RunReport,
    distributed: RunReport,
    summary: DataSummary,
    params: CNNParams,
    config: DistributedConfig,
) -> ReportOutputs:
    """comparison.json and a deck: per-epoch curves, times and accuracies side by side."""
    setup = {
        "dataset": summary.kind, "source": summary.source or "sklearn digits (demo)",
        "classes": len(summary.class_names), "image_shape": summary.image_shape,
        "train_examples": summary.train_examples, "test_examples": summary.test_examples,
        "params": asdict(params), "distributed": asdict(config),
    }  # fmt: skip
    document = build_report(baseline, distributed, setup)
    comparison = Comparison(**document["comparison"])
    path = write_report(document, os.path.join(tempfile.mkdtemp(), "comparison.json"))
    publish("comparison", *cnn.comparison_deck(comparison, baseline, distributed))
    return ReportOutputs(FlyteFile(path), comparison)


@flyray_task(images.image, deck=True, gate=True, timeout=minutes(30))
def register_cnn(
    model: FlyteDirectory,
    test: StructuredDataset,
    report: FlyteFile,
    comparison: Comparison,
    distributed: RunReport,
    summary: DataSummary,
    params: CNNParams,
    config: RegistryConfig,
    recipe: str,
) -> Registration:
    """The Ray-trained model in MLflow (tensorflow flavor), then the champion gate on test
    accuracy against the majority class and the champion scored on the same test images."""
    evidence = cnn.candidate(
        os.path.join(model.download(), MODEL_FILE), read_parquet(uri(test)), comparison,
        distributed, summary, params, metric_key(config.metric), report.download(),
    )  # fmt: skip
    data = DataInput("images", summary.source or "demo-digits", summary.fingerprint,
                     rows=summary.train_examples + summary.test_examples)  # fmt: skip
    return register(config, evidence, images.image, (data,), recipe)
