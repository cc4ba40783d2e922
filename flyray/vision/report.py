"""The comparison of the two runs, in the shape of the original exercise's comparison.json.

{"setup": {...}, "baseline": {...}, "ray_distributed": {...}, "comparison": {"speedup",
"efficiency", ...}}: speedup = baseline time / distributed time, efficiency = speedup / workers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from flyray import storage
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
    fs, path = storage.filesystem(uri)
    with fs.open_output_stream(path) as fh:
        fh.write(json.dumps(report, indent=2).encode())
    return uri
