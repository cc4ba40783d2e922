"""Benchmark: ingest + features throughput and peak memory, Ray path vs single-process pyarrow
vs the naive Ray Data pipeline, on generated JSON lines; and the Ray ingest of every source
layout (layouts.PRESETS) against the JSON-lines one, on the same generated events.

    python -m bench.ingest [--sizes 1000000 10000000] [--naive-max 10000000]
                           [--layout-events 1000000] [--layouts jsonl taobao ...] [--repeats 3]

Each measurement runs in a fresh subprocess (peak RSS is that process's own), on the same
generated file; the layouts share one subprocess and one Ray, run in turn `--repeats` times
(best time kept, so a busy moment on a shared machine does not decide a row). Tables are
printed and bench/results/ingest.json written.
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

from flyray.clickstream.generate import HEADERS
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


def run_layouts(spec: str) -> dict:
    """Ray ingest (layout "auto", as a user runs it) of each layout's file, best of `repeats`;
    a small warm-up ingest first, so no layout pays for starting Ray's workers."""
    import ray

    from flyray.clickstream.ingest import ingest

    files, repeats = json.loads(spec)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=DATA) as out:
        warm = Path(out) / "warm.jsonl"
        warm.write_bytes(Path(files["jsonl"]).read_bytes()[: 1 << 20].rsplit(b"\n", 1)[0])
        ingest(str(warm), f"{out}/warm")
        for _ in range(repeats):
            for layout, path in files.items():
                began = time.perf_counter()
                report = ingest(path, f"{out}/{layout}")
                seconds = time.perf_counter() - began
                best = rows.get(layout, {}).get("seconds", float("inf"))
                rows[layout] = {
                    "seconds": min(seconds, best),
                    "events": report.events,
                    "rejects": report.rejects,
                    "detected": report.layout,
                    "session_users": report.session_users,
                }
    return {"layouts": rows}


RUNNERS = {
    "pyarrow": run_pyarrow,
    "single_process": run_single_process,
    "naive_ray_data": run_naive,
    "flyray_ray": run_flyray,
    "layouts": run_layouts,
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


def _dataset(n_events: int, layout: str = "jsonl") -> Path:
    from flyray.clickstream.generate import GeneratorConfig, generate

    suffix = {"jsonl": ".jsonl", "yoochoose": ".dat"}.get(layout, ".csv")
    name = "" if layout == "jsonl" else f"-{layout}"
    path = DATA / f"clickstream-{n_events}{name}{suffix}"
    if not path.exists():
        print(f"generating {n_events:,} events ({layout}) -> {path}", flush=True)
        generate(path, GeneratorConfig(n_events=n_events, seed=0, layout=layout))
    return path


def _layout_rows(n_events: int, layouts: list[str], repeats: int) -> list[dict]:
    """One row per layout: the Ray ingest of n_events events in it, and its time / JSON lines'."""
    files = {layout: str(_dataset(n_events, layout)) for layout in ["jsonl", *layouts]}
    print(f"running the ingest of {len(files)} layouts x {repeats} ...", flush=True)
    result = _measure("layouts", json.dumps([files, repeats]))
    base = result["layouts"]["jsonl"]["seconds"]
    rows = []
    for layout, row in result["layouts"].items():
        row.update(
            layout=layout,
            n_events=n_events,
            file_mb=Path(files[layout]).stat().st_size / 2**20,
            events_per_s=row["events"] / row["seconds"],
            vs_jsonl=row["seconds"] / base,
        )
        rows.append(row)
    print(
        f"\n{'layout':<13} {'events':>9} {'file MB':>8} {'auto':<13} {'rejects':>7} "
        f"{'ingest s':>8} {'events/s':>10} {'time / jsonl':>12}"
    )
    for r in rows:
        print(
            f"{r['layout']:<13} {r['events']:>9,} {r['file_mb']:>8.1f} {r['detected']:<13} "
            f"{r['rejects']:>7} {r['seconds']:>8.2f} {r['events_per_s']:>10,.0f} "
            f"{r['vs_jsonl']:>11.2f}x"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="ingest + features benchmark")
    # 1M events: about a minute per path on two shared cores; add 10000000 for the scale run.
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument(
        "--naive-max",
        type=int,
        default=10_000_000,
        help="skip the naive Ray Data pipeline above this many events",
    )
    paths = [kind for kind in RUNNERS if kind != "layouts"]
    parser.add_argument("--kinds", nargs="*", default=paths, choices=paths)
    parser.add_argument("--layout-events", type=int, default=1_000_000)
    others = [name for name in HEADERS if name != "jsonl"]
    parser.add_argument("--layouts", nargs="*", default=others, choices=others)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes if args.kinds else []:  # `--kinds` alone: the layouts table only
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
    if rows:
        print(
            f"\n{'events':>11} {'path':<15} {'seconds':>8} {'events/s':>11} {'peak RSS MB':>11}"
            "  notes"
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
    layout_rows = _layout_rows(args.layout_events, args.layouts, args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    out = {"meta": meta, "rows": rows, "layouts": layout_rows}
    (RESULTS / "ingest.json").write_text(json.dumps(out, indent=2))
    print(f"\nwritten {RESULTS / 'ingest.json'}")


if __name__ == "__main__":
    main()
