"""Benchmark: the whole recommendation pipeline on N generated events, time and peak memory.

    python -m bench.pipeline [--events 10000000]

Runs `python -m workflows.run_local --source FILE` (flytekit local execution, a local Ray) in a
fresh subprocess and samples its process tree every second: the driver's peak RSS, and the peak
of the whole tree (driver, Ray's raylet, GCS and workers) as PSS, which splits shared pages
(Ray's object store) between the processes mapping them instead of counting them in each.
Prints a table and writes bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from flyray.clickstream.generate import GeneratorConfig, generate

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".data" / "bench"
RESULTS = REPO / "bench" / "results"


def _tree_memory(root: psutil.Process) -> tuple[int, dict[str, int]]:
    """(driver RSS, PSS of the driver and of every descendant by process title), in bytes."""
    driver = root.memory_info().rss
    by_title: dict[str, int] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            title = " ".join(proc.cmdline())[:60] or proc.name()
            by_title[title] = by_title.get(title, 0) + proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return driver, by_title


def run(source: Path, work: Path) -> dict:
    env = {**os.environ, "FLYRAY_DATA_DIR": str(work / "data"), "TMPDIR": str(work),
           "RAY_TMPDIR": "/tmp", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workflows.run_local", "--source", str(source)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    peaks = {"driver": 0, "tree": 0}
    at_peak: dict = {}
    root = psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            try:
                driver, by_title = _tree_memory(root)
            except psutil.NoSuchProcess:
                return
            tree = sum(by_title.values())
            peaks["driver"] = max(peaks["driver"], driver)
            if tree > peaks["tree"]:
                peaks["tree"] = tree
                top = sorted(by_title.items(), key=lambda kv: -kv[1])[:6]
                at_peak.update(second=round(time.perf_counter() - began),
                               top_mb={k: round(v / 2**20) for k, v in top})  # fmt: skip
            time.sleep(1.0)  # reading every process's PSS costs CPU the pipeline needs

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    sampler.join(timeout=5)
    if proc.returncode:
        raise SystemExit(f"the pipeline failed:\n{output[-4000:]}")
    return {
        "seconds": time.perf_counter() - began,
        "driver_peak_rss_mb": peaks["driver"] / 2**20,
        "tree_peak_pss_mb": peaks["tree"] / 2**20,
        "at_tree_peak": at_peak,
        "summary": output[output.find("=== recommendation_pipeline") :].strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    source = DATA / f"events-{args.events}.jsonl"
    if not source.exists():
        generate(source, GeneratorConfig(n_events=args.events, seed=0))
    work = DATA / f"pipeline-{args.events}"
    shutil.rmtree(work, ignore_errors=True)  # a fresh store and task cache: nothing is reused
    row = run(source, work)
    result = {"events": args.events, "cpus": os.cpu_count(), "machine": platform.machine(),
              "memory_gb": psutil.virtual_memory().total / 2**30, **row}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(result, indent=2))
    print(f"\n| events | seconds | driver peak RSS | whole tree peak PSS |\n|---|---|---|---|\n"
          f"| {args.events:,} | {row['seconds']:.0f} | {row['driver_peak_rss_mb']:,.0f} MB | "
          f"{row['tree_peak_pss_mb']:,.0f} MB |\n\n{row['summary']}\n\n"
          f"written {RESULTS / 'pipeline.json'}")  # fmt: skip


if __name__ == "__main__":
    main()
