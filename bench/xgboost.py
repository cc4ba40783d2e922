"""Benchmark: XGBoost on Ray Train (2 workers) vs plain xgboost.train in one process, and vs the
Ray docs' skeleton (RayTrainReportCallback with its defaults, Ray Data shards via to_pandas).

    python -m bench.xgboost [--rows 1000000] [--features 50] [--rounds 100] [--quick]
                            [--no-skeleton]

One generated table (flyray.tabular.generate, seed 0), prepared once into train/validation/test
(timed apart: it is the same for every row); then, on the same splits, 100 rounds of hist with
early stopping off: `plain` (xgboost.train, nthread = workers), `ray` (flyray: workers read
their rows of the split files in place, reports only with checkpoints) and `skeleton`. Two
no-op Ray Train runs go first: their times are Ray Train's fixed cost, cold and warm, and after
them every Ray row starts on a warm cluster. Each row's wall time includes its own worker-group
start-up; the Ray rows split it into start-up, data and boosting from the workers' timestamps.
Test AUC of each model beside plain's. Writes bench/results/xgboost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import xgboost as xgb

from flyray.raytrain import DistributedConfig
from flyray.tabular.data import TableSpec, prepare, read_split, split_uri
from flyray.tabular.evaluate import evaluate
from flyray.tabular.generate import generate_table
from flyray.tabular.train import XGBParams, predict, train_distributed, train_local

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".data" / "bench"
RESULTS = REPO / "bench" / "results"


def skeleton(train_uri: str, valid_uri: str, spec: TableSpec, params: XGBParams, workers: int):
    """The XGBoostTrainer example from Ray's docs, on the same splits and hyperparameters."""
    from ray.train.xgboost import RayTrainReportCallback, XGBoostTrainer

    def loop(config: dict) -> None:
        shards = [ray.train.get_dataset_shard(n).materialize().to_pandas()
                  for n in ("train", "validation")]  # fmt: skip
        dtrain, dvalid = (xgb.DMatrix(df[spec.features], label=df[spec.label]) for df in shards)
        xgb.train(config["params"], dtrain, num_boost_round=config["rounds"],
                  evals=[(dvalid, "validation")], verbose_eval=False,
                  callbacks=[RayTrainReportCallback()])  # fmt: skip

    began = time.time()
    trainer = XGBoostTrainer(
        loop,
        train_loop_config={"params": params.booster_params(1), "rounds": params.num_boost_round},
        scaling_config=ray.train.ScalingConfig(num_workers=workers),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="xgb-skeleton-")),
        datasets={
            "train": ray.data.read_parquet(train_uri, partitioning=None).materialize(),
            "validation": ray.data.read_parquet(valid_uri, partitioning=None).materialize(),
        },  # materialized first, or Ray Data gets no CPU on a 2-CPU cluster and never starts
    )
    result = trainer.fit()
    wall = time.time() - began
    return RayTrainReportCallback.get_model(result.checkpoint), {"wall_seconds": wall}


def fixed_cost(workers: int) -> float:
    """Wall seconds of an XGBoostTrainer run whose loop does nothing: Ray Train's fixed cost.
    Run first, it also takes the first-run costs of a fresh cluster (imports, process pool)
    off the rows that follow, so that every Ray row, the skeleton's included, starts warm."""
    from ray.train.xgboost import XGBoostTrainer

    began = time.time()
    XGBoostTrainer(
        lambda: None,
        scaling_config=ray.train.ScalingConfig(num_workers=workers),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="xgb-fixed-")),
    ).fit()
    return time.time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description="XGBoost: Ray Train vs one process")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="100k rows, 20 rounds: a smoke run")
    parser.add_argument("--no-skeleton", action="store_true", help="skip the docs' skeleton")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.rounds = 100_000, 20
    DATA.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = DATA / f"xgboost-{args.rows}x{args.features}.parquet"
    if not table.exists():
        generate_table(str(table), args.rows, args.features, seed=0)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    params = XGBParams(num_boost_round=args.rounds, early_stopping_rounds=0)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=DATA) as out:
        began = time.time()
        spec = prepare(str(table), out)
        prepare_seconds = time.time() - began
        tr, va = split_uri(out, "train"), split_uri(out, "validation")
        x_test, y_test = read_split(split_uri(out, "test"), spec)

        def record(name: str, booster: xgb.Booster, timing: dict) -> None:
            auc = evaluate(predict(booster, spec, x_test), y_test, name).auc
            rows[name] = {**timing, "test_auc": auc, "rounds": booster.num_boosted_rounds()}
            print(f"{name}: {json.dumps(rows[name])}", flush=True)

        def split_of(report) -> dict:
            return {"wall_seconds": report.total_seconds, "startup_seconds": report.startup_seconds,
                    "data_seconds": report.data_seconds,
                    "boosting_seconds": report.boosting_seconds}  # fmt: skip

        first_fit = fixed_cost(args.workers)
        fixed = fixed_cost(args.workers)
        print(f"Ray Train no-op fit: {first_fit:.1f} s cold, {fixed:.1f} s warm", flush=True)
        booster, report = train_local(tr, va, spec, params, nthread=args.workers)
        record("plain", booster, split_of(report))
        config = DistributedConfig(
            workers=args.workers, checkpoint_every=25, checkpoint_uri=tempfile.mkdtemp(dir=out)
        )
        booster, report = train_distributed(tr, va, spec, params, config)
        record("ray", booster, split_of(report))
        if not args.no_skeleton:
            record("skeleton", *skeleton(tr, va, spec, params, args.workers))
    plain = rows["plain"]
    for row in rows.values():
        row["vs_plain"] = row["wall_seconds"] / plain["wall_seconds"]
        row["auc_minus_plain"] = row["test_auc"] - plain["test_auc"]
        if "skeleton" in rows:
            row["skeleton_speedup"] = rows["skeleton"]["wall_seconds"] / row["wall_seconds"]
    meta = {
        "rows": args.rows, "features": args.features, "rounds": args.rounds,
        "workers": args.workers, "prepare_seconds": prepare_seconds, "cpus": os.cpu_count(),
        "noop_fit_cold_seconds": first_fit, "noop_fit_warm_seconds": fixed,
        "load_average": os.getloadavg(), "xgboost": xgb.__version__, "ray": ray.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
    }  # fmt: skip
    print(f"\n{args.rows:,} rows x {args.features} features, {args.rounds} rounds hist, "
          f"{args.workers} workers; prepare {prepare_seconds:.1f} s; Ray Train no-op fit "
          f"{first_fit:.1f} s cold, {fixed:.1f} s warm; load average "
          f"{meta['load_average'][0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    head = ("path", "wall s", "start-up s", "data s", "boosting s", "x plain", "skeleton/x",
            "test AUC", "AUC - plain")  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, r in rows.items():
        cells = [name, r["wall_seconds"], r.get("startup_seconds"), r.get("data_seconds"),
                 r.get("boosting_seconds"), r["vs_plain"], r.get("skeleton_speedup"),
                 r["test_auc"], r["auc_minus_plain"]]  # fmt: skip
        print("| " + " | ".join(_fmt(c) for c in cells) + " |")
    (RESULTS / "xgboost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwritten {RESULTS / 'xgboost.json'}")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)


if __name__ == "__main__":
    main()
