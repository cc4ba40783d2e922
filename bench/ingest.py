"""Benchmark: ingest + features throughput and peak memory, Ray path vs single-process pyarrow
vs the naive Ray Data pipeline, on generated JSON lines.

    python -m bench.ingest [--sizes 1000000 10000000] [--naive-max 10000000]

Each measurement runs in a fresh subprocess (peak RSS is that process's own), on the same
generated file; a table is printed and bench/results/ingest.json written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flyray.clickstream.parse import parse_block

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".data" / "bench"
RESULTS = REPO / "bench" / "results"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_pyarrow(path: str) -> dict:
    """The issue's bar: pyarrow's multi-threaded reader, the same validation, weights and a
    group_by per (user, item); no dedup, split or output (less work than the Ray path)."""
    import numpy as np
    import pyarrow as pa

    from flyray.clickstream.config import FeatureConfig

    began = time.perf_counter()
    with open(path, "rb") as fh:
        events = parse_block(fh.read(), "jsonl", use_threads=True).events
    weights = FeatureConfig().weight_vector()[events["event_code"].to_numpy()]
    events = events.append_column("weight", pa.array(weights))
    pairs = events.group_by(["user_id", "item_id"]).aggregate(
        [("weight", "sum"), ("weight", "count"), ("ts", "min"), ("ts", "max")]
    )
    seconds = time.perf_counter() - began
    return {
        "seconds": seconds,
        "events": events.num_rows,
        "pairs": pairs.num_rows,
        "check": float(np.sum(pairs["weight_sum"].to_numpy())),
    }


def run_single_process(path: str) -> dict:
    """The same work as the Ray path in one process: pyarrow's multi-threaded reader, the same
    validation, and the same feature functions run over all users at once, outputs written."""
    from flyray.clickstream import features as F
    from flyray.clickstream.config import FeatureConfig

    cfg = FeatureConfig()
    with tempfile.TemporaryDirectory(dir=DATA) as out:
        began = time.perf_counter()
        with open(path, "rb") as fh:
            events = parse_block(fh.read(), "jsonl", use_threads=True).events
        mid = time.perf_counter()
        out_fs, out_path = F.prepare_output(f"{out}/features")
        stats_a, srt = F.sort_events(events)
        del events
        n_seen, kept = F.select_items([stats_a], cfg)
        stats_b, table = F.rate_pairs(srt, kept, cfg)
        items = F.rated_items([stats_b], n_seen, kept, cfg)
        sizes = [F.write_splits(table, stats_b["users"], 0, items, out_fs, out_path, 0)]
        profile = F.finalize(
            out_fs, out_path, [stats_a], [stats_b], sizes, items, n_seen, None, mid
        )
        seconds = time.perf_counter() - began
    return {
        "seconds": seconds,
        "ingest_seconds": mid - began,
        "features_seconds": seconds - (mid - began),
        "ratings": sum(profile.ratings_by_split.values()),
    }


def run_naive(path: str) -> dict:
    """The Ray Data defaults: read_json(lines=True), map_batches, groupby shuffle."""
    import numpy as np
    import ray

    from flyray.clickstream.config import FeatureConfig

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    weights = FeatureConfig().event_weights
    began = time.perf_counter()

    def weigh(batch):
        batch["weight"] = np.array([weights.get(t, 0.0) for t in batch["event_type"]])
        return batch

    ds = ray.data.read_json(path, lines=True).map_batches(weigh, batch_format="pandas")
    pairs = ds.groupby(["user_id", "item_id"]).sum("weight").materialize()
    n = pairs.count()
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "pairs": n}


def run_flyray(path: str) -> dict:
    """flyray's Ray path: byte-range ingest on Ray Data, then per-bucket features on Ray."""
    import ray

    from flyray.clickstream.features import build_features
    from flyray.clickstream.ingest import ingest

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(dir=DATA) as out:
        began = time.perf_counter()
        report = ingest(path, f"{out}/ingest")
        mid = time.perf_counter()
        profile = build_features(report.events_uri, f"{out}/features", ingest_report=report)
        seconds = time.perf_counter() - began
    return {
        "seconds": seconds,
        "ingest_seconds": mid - began,
        "features_seconds": seconds - (mid - began),
        "events": report.events,
        "ratings": sum(profile.ratings_by_split.values()),
    }


RUNNERS = {
    "pyarrow": run_pyarrow,
    "single_process": run_single_process,
    "naive_ray_data": run_naive,
    "flyray_ray": run_flyray,
}


def _measure(kind: str, path: str) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON line."""
    code = (
        "import json,sys; from bench.ingest import RUNNERS, _peak_rss_mb; "
        f"r = RUNNERS[{kind!r}]({path!r}); r['driver_peak_rss_mb'] = _peak_rss_mb(); "
        "print('RESULT ' + json.dumps(r))"
    )
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")


def _dataset(n_events: int) -> Path:
    from flyray.clickstream.generate import GeneratorConfig, generate

    path = DATA / f"clickstream-{n_events}.jsonl"
    if not path.exists():
        print(f"generating {n_events:,} events -> {path}", flush=True)
        generate(path, GeneratorConfig(n_events=n_events, seed=0))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="ingest + features benchmark")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument(
        "--naive-max",
        type=int,
        default=10_000_000,
        help="skip the naive Ray Data pipeline above this many events",
    )
    parser.add_argument("--kinds", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        path = _dataset(n)
        for kind in args.kinds:
            if kind == "naive_ray_data" and n > args.naive_max:
                continue
            print(f"running {kind} on {n:,} events ...", flush=True)
            result = _measure(kind, str(path))
            result.update(
                kind=kind,
                n_events=n,
                file_mb=path.stat().st_size / 2**20,
                events_per_s=n / result["seconds"],
            )
            rows.append(result)
    for n in args.sizes:
        by = {r["kind"]: r for r in rows if r["n_events"] == n}
        if "flyray_ray" not in by or "pyarrow" not in by:
            continue
        ray_s = by["flyray_ray"]["seconds"]
        by["flyray_ray"]["vs_pyarrow"] = by["pyarrow"]["seconds"] / ray_s
        if "single_process" in by:
            by["flyray_ray"]["vs_single_process"] = by["single_process"]["seconds"] / ray_s
        if "naive_ray_data" in by:
            by["flyray_ray"]["vs_naive"] = by["naive_ray_data"]["seconds"] / ray_s
    print(
        f"\n{'events':>11} {'path':<15} {'seconds':>8} {'events/s':>11} {'peak RSS MB':>11}  notes"
    )
    for r in rows:
        notes = ""
        if r["kind"] == "single_process":
            notes = f"read {r['ingest_seconds']:.1f}s + features {r['features_seconds']:.1f}s"
        if r["kind"] == "flyray_ray":
            notes = f"ingest {r['ingest_seconds']:.1f}s + features {r['features_seconds']:.1f}s"
            if "vs_pyarrow" in r:
                notes += f"; {r['vs_pyarrow']:.2f}x pyarrow"
            if "vs_single_process" in r:
                notes += f", {r['vs_single_process']:.2f}x single process"
            if "vs_naive" in r:
                notes += f", {r['vs_naive']:.1f}x naive"
        print(
            f"{r['n_events']:>11,} {r['kind']:<15} {r['seconds']:>8.1f} "
            f"{r['events_per_s']:>11,.0f} {r['driver_peak_rss_mb']:>11.0f}  {notes}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    (RESULTS / "ingest.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwritten {RESULTS / 'ingest.json'}")


if __name__ == "__main__":
    main()
