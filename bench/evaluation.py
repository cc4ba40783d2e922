"""Benchmark: top-N ranking throughput (users per second), the same factors three ways.

    python -m bench.evaluation [--sizes 1m 10m] [--users 20000] [--repeats 3]

What the evaluation and batch recommendations spend their time on: for each user, score every
item, leave out the user's training items, keep the 10 best in order. Compared on identical
factors and training items (float32, 64 factors):

- flyray: FactorModel.top_n_indexed, blocks of users scored by one BLAS product each, the best
  n selected by a compiled bounded heap (flyray.recsys.kernels.top_n);
- numpy: the same blocks with seen items masked in a Python loop and np.argpartition, the
  best single-process NumPy a user would write (flyray's own path before the kernel);
- implicit: implicit's batch `recommend` (its CPU ALS model, factors set to these), the
  library a practitioner would pick.

Sizes follow the pipeline's demo data: `1m` is the 1M-event demo's users x items, `10m` the
10M one's. The ranked users are a seeded sample (the evaluation's 20,000). Every way must
return the same items (compared per user as sets, ties aside); the table says how many agree.
Writes bench/results/evaluation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from flyray.recsys.model import FactorModel

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SIZES = {"1m": (50_000, 10_000), "10m": (250_000, 100_000)}  # users, items of the demo data
FACTORS, N, PER_USER = 64, 10, 20  # training items per user: the demo's median is ~20


def factors(n_users: int, n_items: int, seed: int = 0) -> FactorModel:
    """Random factors with popularity-skewed training items, as a trained model has."""
    rng = np.random.default_rng(seed)
    model = FactorModel.empty(np.arange(n_users), np.arange(n_items), FACTORS)
    model.P = rng.normal(0, 0.3, (n_users, FACTORS)).astype(np.float32)
    model.Q = rng.normal(0, 0.3, (n_items, FACTORS)).astype(np.float32)
    users = np.repeat(np.arange(n_users), PER_USER)
    items = (rng.zipf(1.2, len(users)) - 1) % n_items
    pairs = np.unique(users.astype(np.int64) * n_items + items)
    return model.set_seen(pairs // n_items, pairs % n_items)


def numpy_top_n(model: FactorModel, rows: np.ndarray, n: int, block: int = 2048) -> np.ndarray:
    """Blocks of users: BLAS scores, seen items masked per user, argpartition, then a sort."""
    out = np.empty((len(rows), n), np.int64)
    for s in range(0, len(rows), block):
        r = rows[s : s + block]
        scores = model.P[r] @ model.Q.T
        for k, row in enumerate(r):
            scores[
                k, model.seen_items[model.seen_indptr[row] : model.seen_indptr[row + 1]]
            ] = -np.inf
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        out[s : s + block] = np.take_along_axis(top, order, 1)
    return out


def implicit_top_n(model: FactorModel, rows: np.ndarray, n: int):
    """implicit's batch recommend over the same factors and training items."""
    from implicit.cpu.als import AlternatingLeastSquares

    als = AlternatingLeastSquares(factors=FACTORS)
    als.user_factors, als.item_factors = model.P, model.Q
    seen = sp.csr_matrix(
        (np.ones(len(model.seen_items), np.float32), model.seen_items, model.seen_indptr),
        shape=(len(model.user_ids), len(model.item_ids)),
    )

    def run() -> np.ndarray:
        ids, _ = als.recommend(rows, seen[rows], N=n, filter_already_liked_items=True)
        return ids

    return run


def _timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    fn()  # compile and warm the caches
    best, out = float("inf"), None
    for _ in range(repeats):
        began = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - began)
    return best, out


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b, strict=True)]))


def bench(size: str, users: int, repeats: int) -> list[dict]:
    n_users, n_items = SIZES[size]
    model = factors(n_users, n_items)
    rows = np.sort(np.random.default_rng(1).choice(n_users, min(users, n_users), replace=False))
    ways = {
        "flyray (BLAS + compiled top-N)": lambda: model.top_n_indexed(rows, N)[0],
        "numpy argpartition": lambda: numpy_top_n(model, rows, N),
        "implicit recommend": implicit_top_n(model, rows, N),
    }
    results, reference = [], None
    for name, fn in ways.items():
        seconds, top = _timed(fn, repeats)
        reference = top if reference is None else reference
        results.append({
            "size": size, "users x items": f"{n_users:,} x {n_items:,}", "way": name,
            "ranked users": len(rows), "seconds": round(seconds, 3),
            "users_per_s": round(len(rows) / seconds),
            "agreement": round(_agree(top, reference), 4),
        })  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [row for size in args.sizes for row in bench(size, args.users, args.repeats)]
    print(f"{'size':5} {'users x items':20} {'way':32} {'s':>7} {'users/s':>9} {'agree':>6}")
    for r in rows:
        print(f"{r['size']:5} {r['users x items']:20} {r['way']:32} {r['seconds']:7.3f} "
              f"{r['users_per_s']:9,} {r['agreement']:6.3f}")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "factors": FACTORS, "n": N}  # fmt: skip
    (RESULTS / "evaluation.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
