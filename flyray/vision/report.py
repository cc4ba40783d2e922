"""The comparison of the two runs, in the shape of the original exercise's comparison.json.

{"setup": {...}, "baseline": {...}, "ray_distributed": {...}, "comparison": {"speedup",
"efficiency", ...}}: speedup = baseline time / distributed time, efficiency = speedup / workers.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass

import numpy as np

from flyray import decks, storage
from flyray.drift import Column
from flyray.registry import Candidate, RunRecord, TaskIdentity
from flyray.vision.data import DataSummary, ImageSet
from flyray.vision.evaluate import champion_accuracy
from flyray.vision.model import CNNParams
from flyray.vision.train import RunReport


@dataclass
class Comparison:
    speedup: float  # baseline training time / distributed training time
    efficiency: float  # speedup / workers
    epoch_speedup: float  # the same ratio over the epochs alone (without start-up)
    workers: int
    baseline_seconds: float
    distributed_seconds: float
    baseline_test_accuracy: float
    distributed_test_accuracy: float
    accuracy_difference: float  # distributed - baseline
    same_machine: bool
    note: str


def compare(baseline: RunReport, distributed: RunReport) -> Comparison:
    speedup = baseline.training_time_seconds / distributed.training_time_seconds
    same_machine = distributed.nodes == 1 and distributed.hosts == baseline.hosts
    if same_machine:
        note = (
            f"Both runs ran on one machine ({baseline.hosts[0]}, {baseline.host_cpus} CPUs), one "
            f"after the other: the baseline used {baseline.cpus:g} CPUs "
            f"({baseline.intra_op_threads} TF threads), the {distributed.workers} Ray workers "
            f"shared {distributed.cpus:g} CPUs of the same cores (TF threads: "
            f"{distributed.intra_op_threads} each). This measures Ray Train's overhead and "
            "scaling on one node; it is not a multi-node result."
        )
    else:
        note = (
            f"The baseline used {baseline.cpus:g} CPUs on {baseline.hosts[0]}; the "
            f"{distributed.workers} Ray workers used {distributed.cpus:g} CPUs on "
            f"{distributed.nodes} node(s). The speedup compares those budgets."
        )
    if distributed.resumed_from_epoch:
        note += (
            f" A Ray worker failed and the run resumed from epoch {distributed.resumed_from_epoch}"
            "'s checkpoint: its time includes the restart."
        )
    return Comparison(
        speedup=speedup,
        efficiency=speedup / distributed.workers,
        epoch_speedup=sum(baseline.epoch_seconds) / sum(distributed.epoch_seconds),
        workers=distributed.workers,
        baseline_seconds=baseline.training_time_seconds,
        distributed_seconds=distributed.training_time_seconds,
        baseline_test_accuracy=baseline.test_accuracy,
        distributed_test_accuracy=distributed.test_accuracy,
        accuracy_difference=distributed.test_accuracy - baseline.test_accuracy,
        same_machine=same_machine,
        note=note,
    )


def _run_section(run: RunReport) -> dict:
    return {
        "training_time_seconds": run.training_time_seconds,
        "test_accuracy": run.test_accuracy,
        "test_loss": run.test_loss,
        "epoch_times_seconds": run.epoch_seconds,
        # = start-up (processes, TF cluster, data shards) + checkpoints + shutdown
        "outside_epochs_seconds": run.training_time_seconds - sum(run.epoch_seconds),
        "startup_seconds": run.startup_seconds,
        "checkpoint_seconds": run.checkpoint_seconds,
        "shutdown_seconds": run.shutdown_seconds,
        "resumed_from_epoch": run.resumed_from_epoch,
        "train_loss": run.train_loss,
        "train_accuracy": run.train_accuracy,
        "workers": run.workers,
        "cpu_budget": run.cpus,
        "threads": {"intra_op": run.intra_op_threads, "inter_op": run.inter_op_threads},
        "hosts": run.hosts,
        "nodes": run.nodes,
        "host_cpus": run.host_cpus,
        "steps_per_epoch": run.steps_per_epoch,
        "per_worker_batch_size": run.per_worker_batch_size,
        "train_examples": run.train_examples,
        "test_examples": run.test_examples,
        "tensorflow_version": run.tensorflow_version,
        "keras_version": run.keras_version,
    }


def build_report(baseline: RunReport, distributed: RunReport, setup: dict) -> dict:
    """The comparison.json document; `setup` says what both runs shared (data, parameters)."""
    return {
        "setup": setup,
        "baseline": _run_section(baseline),
        "ray_distributed": _run_section(distributed),
        "comparison": asdict(compare(baseline, distributed)),
    }


def write_report(report: dict, uri: str) -> str:
    """comparison.json, written atomically."""
    fs, path = storage.filesystem(uri)
    storage.write_atomic(fs, path, json.dumps(report, indent=2).encode())
    return uri


def data_deck(summary: DataSummary, sample: ImageSet) -> list[str]:
    counts = dict(zip(summary.class_names, map(float, summary.train_class_counts), strict=True))
    facts = {k: v for k, v in asdict(summary).items() if k != "train_class_counts"}
    return [
        decks.table_html(facts, "Data"),
        decks.bar_chart_html(counts, "Training images per class", "images"),
        _sample_grid(sample.images[:16], [summary.class_names[i] for i in sample.labels[:16]]),
    ]


def _sample_grid(pictures: np.ndarray, titles: list[str]) -> str:
    fig, axes = decks.plt.subplots(2, 8, figsize=(8, 2.4))
    for ax, picture, title in zip(axes.flat, pictures, titles, strict=False):
        ax.imshow(picture)
        ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    return decks.figure_html(fig)


def comparison_deck(comparison: Comparison, baseline: RunReport, distributed: RunReport):
    label = f"ray ({distributed.workers} workers)"
    epochs = list(range(1, len(baseline.epoch_seconds) + 1))

    def side_by_side(field: str) -> dict[str, list[float]]:
        return {"baseline": getattr(baseline, field), label: getattr(distributed, field)}

    times = {
        name: {"training s": run.training_time_seconds, "epochs s": sum(run.epoch_seconds)}
        for name, run in (("baseline", baseline), (label, distributed))
    }
    accuracy = {"baseline": baseline.test_accuracy, label: distributed.test_accuracy}
    return [
        f"<p>{html.escape(comparison.note)}</p>",
        decks.table_html(asdict(comparison), "Baseline vs Ray Train"),
        decks.grouped_bar_html(times, "Training time", "seconds"),
        decks.line_chart_html(epochs, side_by_side("epoch_seconds"), "Seconds per epoch",
                              "epoch", "seconds"),
        decks.line_chart_html(epochs, side_by_side("train_accuracy"), "Training accuracy",
                              "epoch", "accuracy"),
        decks.bar_chart_html(accuracy, "Test accuracy", "accuracy"),
    ]  # fmt: skip


def identity(summary: DataSummary, metric: str) -> TaskIdentity:
    """The classes and the image shape."""
    target = f"{len(summary.class_names)} classes {summary.class_names}"
    return TaskIdentity("image_classification", target, f"images {summary.image_shape}", metric)


def run_record(
    comparison: Comparison, distributed: RunReport, summary: DataSummary, params: CNNParams,
    metric_key: str, report_file: str,
) -> RunRecord:  # fmt: skip
    curves = {
        epoch: {"train_loss": loss, "train_accuracy": acc, "epoch_seconds": secs}
        for epoch, (loss, acc, secs) in enumerate(
            zip(distributed.train_loss, distributed.train_accuracy, distributed.epoch_seconds,
                strict=True), start=1,
        )
    }  # fmt: skip
    return RunRecord(
        params={
            **{f"model.{k}": v for k, v in asdict(params).items()},
            "data.kind": summary.kind,
            "data.source": summary.source or "digits",
            "ray.workers": distributed.workers,
        },  # fmt: skip
        metrics={
            metric_key: comparison.distributed_test_accuracy,
            "baseline.test_accuracy": comparison.baseline_test_accuracy,
            "majority_class.accuracy": summary.majority_test_accuracy,
            "speedup": comparison.speedup,
            "efficiency": comparison.efficiency,
            "epoch_speedup": comparison.epoch_speedup,
            "baseline.training_time_seconds": comparison.baseline_seconds,
            "ray.training_time_seconds": comparison.distributed_seconds,
        },  # fmt: skip
        curves=curves,
        files=[report_file],
    )


def log_model(
    model_file: str, image_shape: list[int], class_names: list[str], registered_name: str | None
):
    """The Keras model with MLflow's tensorflow flavor, an input example and its class names
    (the MLmodel's metadata: output k is class_names[k], what a server answers with)."""
    import mlflow
    import tf_keras as keras

    example = np.zeros((2, *image_shape), np.float32)
    return mlflow.tensorflow.log_model(
        keras.models.load_model(model_file), name="model", input_example=example,
        registered_model_name=registered_name, metadata={"class_names": list(class_names)},
    )  # fmt: skip


def candidate(
    model_file: str, test: ImageSet, comparison: Comparison, distributed: RunReport,
    summary: DataSummary, params: CNNParams, metric_key: str, report_file: str,
) -> Candidate:  # fmt: skip
    """The Ray-trained CNN for the registry, judged against always answering the majority
    class; the champion is scored on the same test images."""
    return Candidate(
        identity(summary, metric_key),
        run_record(comparison, distributed, summary, params, metric_key, report_file),
        lambda name: log_model(model_file, summary.image_shape, summary.class_names, name),
        comparison.distributed_test_accuracy,
        summary.majority_test_accuracy,
        lambda uri: champion_accuracy(uri, test),
        {
            "class_balance": Column(
                counts=dict(
                    zip(summary.class_names, map(float, summary.train_class_counts), strict=True)
                )
            )
        },  # fmt: skip
    )
