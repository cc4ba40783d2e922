"""Benchmark: the CNN in one process vs Ray Train on N workers (cnn_benchmark's compute).

    python -m bench.cnn [--epochs 10] [--batch-size 64] [--workers 2] [--source DIR] [--quick]

Same data, epochs, global batch size, learning rate and seed for both runs; the baseline uses
every CPU of this machine, each Ray worker --cpus-per-worker CPUs and as many TF threads.
Default data: scikit-learn's digits at 32x32x3 (offline); --source takes CIFAR-10's python
layout or an image folder. Writes bench/results/cnn.json (the workflow's comparison.json).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import ray

from flyray.raytrain import DistributedConfig
from flyray.vision.data import prepare
from flyray.vision.model import CNNParams
from flyray.vision.report import build_report
from flyray.vision.train import available_cpus, train_baseline, train_distributed

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description="CNN: one process vs Ray Train")
    parser.add_argument("--source", default="", help='"" = sklearn digits; CIFAR-10 dir; folder')
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="global, over all workers")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 epochs: a smoke run")
    args = parser.parse_args()
    params = CNNParams(
        epochs=2 if args.quick else args.epochs, global_batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed,
    )  # fmt: skip
    config = DistributedConfig(workers=args.workers, cpus_per_worker=args.cpus_per_worker)
    ray.init(num_cpus=available_cpus(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        summary = prepare(args.source, tmp, args.image_size, seed=args.seed)
        train, test = os.path.join(tmp, "train"), os.path.join(tmp, "test")
        baseline = train_baseline(train, test, params)
        config.checkpoint_uri = os.path.join(tmp, "ray-train")
        distributed = train_distributed(train, test, params, config)
    setup = {"dataset": summary.kind, "source": args.source or "sklearn digits",
             "image_shape": summary.image_shape, "train_examples": summary.train_examples,
             "test_examples": summary.test_examples, "params": params.__dict__,
             "distributed": config.__dict__ | {"checkpoint_uri": ""}}  # fmt: skip
    report = build_report(baseline, distributed, setup)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cnn.json").write_text(json.dumps(report, indent=2))
    c = report["comparison"]
    print(f"\nCNN on {summary.kind}: {summary.train_examples} train / {summary.test_examples} test "
          f"images {summary.image_shape}, {params.epochs} epochs, global batch "
          f"{params.global_batch_size}, lr {params.learning_rate}")  # fmt: skip
    print(f"{'run':<22} {'train s':>8} {'epochs s':>9} {'startup s':>10} {'other s':>8} "
          f"{'CPUs':>5} {'threads':>8} {'test acc':>9}")  # fmt: skip
    for name, key in (("baseline (1 process)", "baseline"),
                      (f"ray ({config.workers} workers)", "ray_distributed")):  # fmt: skip
        r = report[key]
        epochs_s = sum(r["epoch_times_seconds"])
        print(f"{name:<22} {r['training_time_seconds']:>8.1f} {epochs_s:>9.1f} "
              f"{r['startup_seconds']:>10.1f} "
              f"{r['outside_epochs_seconds'] - r['startup_seconds']:>8.1f} {r['cpu_budget']:>5g} "
              f"{r['threads']['intra_op']:>8} {r['test_accuracy']:>9.4f}")  # fmt: skip
    print(f"speedup {c['speedup']:.2f}, efficiency {c['efficiency']:.2f}, epochs-only speedup "
          f"{c['epoch_speedup']:.2f}\n{c['note']}\nwritten {RESULTS / 'cnn.json'}")  # fmt: skip


if __name__ == "__main__":
    main()
