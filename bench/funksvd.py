"""Benchmark: FunkSVD's compiled kernel vs scikit-surprise's SVD, DSGD scaling over Ray workers,
and RMSE per epoch of DSGD beside gradient averaging.

    python -m bench.funksvd [--surprise-events 3000000] [--ratings 5000000] [--epochs 10]

1. Surprise vs flyray, one process, same data, split and hyperparameters (k=100, 20 epochs,
   lr 0.005, reg 0.02): ratings from the demo clickstream through prepare_data's feature code.
2. dsgd with 1 vs 2 Ray workers on --ratings synthetic ratings from known factors.
3. dsgd vs gradient averaging (bench/gradient_averaging.py, the original system's training),
   validation RMSE per epoch: bench/results/funksvd_rmse.png.
Writes bench/results/funksvd.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from bench import gradient_averaging
from flyray.raytrain import DistributedConfig
from flyray.recsys import FunkSVD, FunkSVDParams
from flyray.recsys.distributed import train
from flyray.recsys.model import Ratings

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".data" / "bench"
RESULTS = REPO / "bench" / "results"


def demo_ratings(n_events: int) -> tuple:
    """train and test (user_id, item_id, rating) frames from the demo clickstream."""
    from flyray.clickstream.features import build_features
    from flyray.clickstream.generate import GeneratorConfig, generate
    from flyray.clickstream.ingest import ingest

    src = DATA / f"clickstream-{n_events}.jsonl"
    if not src.exists():
        generate(src, GeneratorConfig(n_events=n_events, seed=0))
    with tempfile.TemporaryDirectory(dir=DATA) as out:
        report = ingest(str(src), f"{out}/ingest")
        build_features(report.events_uri, f"{out}/features", ingest_report=report)
        cols = ["user_id", "item_id", "rating"]
        train_df = pq.read_table(f"{out}/features/train", columns=cols).to_pandas()
        test_df = pq.read_table(f"{out}/features/test", columns=cols).to_pandas()
    return train_df, test_df


def vs_surprise(train_df, test_df, params: FunkSVDParams) -> dict:
    from surprise import SVD, Dataset, Reader

    rows = {}
    data = Dataset.load_from_df(train_df, Reader(rating_scale=(1, 5)))
    trainset = data.build_full_trainset()
    algo = SVD(
        n_factors=params.n_factors, n_epochs=params.n_epochs, lr_all=params.lr,
        reg_all=params.reg, init_std_dev=params.init_std, random_state=params.seed,
    )  # fmt: skip
    began = time.perf_counter()
    algo.fit(trainset)
    fit = time.perf_counter() - began
    pairs = zip(test_df.user_id, test_df.item_id, strict=True)
    preds = np.array([algo.predict(u, i).est for u, i in pairs])
    rows["surprise"] = _row(fit, len(train_df) * params.n_epochs, preds, test_df)
    FunkSVD(FunkSVDParams(**{**params.__dict__, "n_epochs": 1})).fit(train_df.head(1000))  # jit
    began = time.perf_counter()
    model = FunkSVD(params).fit(train_df)
    fit = time.perf_counter() - began
    rows["flyray"] = _row(fit, len(train_df) * params.n_epochs, model.score(
        test_df.user_id, test_df.item_id), test_df)  # fmt: skip
    rows["flyray"]["speedup_vs_surprise"] = (
        rows["flyray"]["updates_per_s"] / rows["surprise"]["updates_per_s"]
    )
    rows["flyray"]["rmse_minus_surprise"] = rows["flyray"]["rmse"] - rows["surprise"]["rmse"]
    return rows


def _row(fit: float, updates: int, preds: np.ndarray, test_df) -> dict:
    rmse = float(np.sqrt(np.mean((preds - test_df.rating.to_numpy()) ** 2)))
    return {"fit_seconds": fit, "updates_per_s": updates / fit, "rmse": rmse}


def synthetic(n: int, seed: int = 0) -> tuple[Ratings, Ratings, int, int]:
    rng = np.random.default_rng(seed)
    n_users, n_items = max(1000, n // 100), max(500, n // 250)  # ~100 ratings per user
    pt, qt = rng.normal(0, 0.5, (n_users, 10)), rng.normal(0, 0.5, (n_items, 10))
    u = rng.integers(0, n_users, n).astype(np.int32)
    i = rng.integers(0, n_items, n).astype(np.int32)
    r = np.clip(3.0 + np.einsum("nk,nk->n", pt[u], qt[i]) + rng.normal(0, 0.4, n), 1, 5)
    cut = int(n * 0.9)
    return (Ratings(u[:cut], i[:cut], r[:cut]), Ratings(u[cut:], i[cut:], r[cut:]),
            n_users, n_items)  # fmt: skip


def scaling(n: int, epochs: int) -> dict:
    tr, va, n_users, n_items = synthetic(n)
    params = FunkSVDParams(n_factors=100, n_epochs=epochs, lr=0.02, reg=0.05)
    out = {}
    for strategy, workers in (("dsgd", 1), ("dsgd", 2), ("gradient_averaging", 2)):
        began = time.perf_counter()
        if strategy == "dsgd":
            config = DistributedConfig(workers=workers, min_workers=0)  # always that many
            model = train(tr, n_users, n_items, params, config, va)
        else:
            model = gradient_averaging.train(tr, n_users, n_items, params, workers, va)
        wall = time.perf_counter() - began
        steady = [h.seconds for h in model.history[1:]] or [model.history[0].seconds]
        out[f"{strategy}_{workers}"] = {
            "strategy": strategy, "workers": workers, "ratings": len(tr), "wall_seconds": wall,
            "epoch_seconds": float(np.mean(steady)),
            "updates_per_s": len(tr) / float(np.mean(steady)),
            "validation_rmse": [h.validation_rmse for h in model.history],
            "train_rmse": [h.train_rmse for h in model.history],
        }  # fmt: skip
    one, two = out["dsgd_1"], out["dsgd_2"]
    two["speedup"] = one["epoch_seconds"] / two["epoch_seconds"]
    two["efficiency"] = two["speedup"] / 2
    two["wall_speedup"] = one["wall_seconds"] / two["wall_seconds"]
    two["rmse_minus_one_worker"] = two["validation_rmse"][-1] - one["validation_rmse"][-1]
    return out


def plot(scaling_rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("dsgd_2", "dsgd, 2 workers"), ("dsgd_1", "dsgd, 1 worker"),
                       ("gradient_averaging_2", "gradient averaging, 2 workers")):  # fmt: skip
        curve = scaling_rows[key]["validation_rmse"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation RMSE")
    ax.set_title(f"FunkSVD on {scaling_rows['dsgd_1']['ratings']:,} ratings, k=100")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="FunkSVD benchmark")
    parser.add_argument("--surprise-events", type=int, default=3_000_000)
    parser.add_argument("--ratings", type=int, default=5_600_000, help="90%% train")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    train_df, test_df = demo_ratings(args.surprise_events)
    params = FunkSVDParams(n_factors=100, n_epochs=20, lr=0.005, reg=0.02, seed=0)
    versus = vs_surprise(train_df, test_df, params)
    scale = scaling(args.ratings, args.epochs)
    plot(scale, RESULTS / "funksvd_rmse.png")
    result = {"train_ratings": len(train_df), "test_ratings": len(test_df),
              "vs_surprise": versus, "scaling": scale}  # fmt: skip
    (RESULTS / "funksvd.json").write_text(json.dumps(result, indent=2))
    print(f"\nSurprise vs flyray: {len(train_df):,} train / {len(test_df):,} test ratings, k=100, "
          "20 epochs")  # fmt: skip
    print(f"{'':<10} {'fit s':>8} {'updates/s':>12} {'test RMSE':>10}")
    for name, row in versus.items():
        print(f"{name:<10} {row['fit_seconds']:>8.1f} {row['updates_per_s']:>12,.0f} "
              f"{row['rmse']:>10.4f}")  # fmt: skip
    print(f"flyray: {versus['flyray']['speedup_vs_surprise']:.1f}x Surprise's updates/s, RMSE "
          f"{versus['flyray']['rmse_minus_surprise']:+.4f}")  # fmt: skip
    print(f"\nRay training on {scale['dsgd_1']['ratings']:,} ratings, k=100, {args.epochs} epochs")
    print(f"{'run':<22} {'epoch s':>8} {'wall s':>8} {'updates/s':>12} {'final val RMSE':>15}")
    for name, row in scale.items():
        print(f"{name:<22} {row['epoch_seconds']:>8.2f} {row['wall_seconds']:>8.1f} "
              f"{row['updates_per_s']:>12,.0f} {row['validation_rmse'][-1]:>15.4f}")  # fmt: skip
    two = scale["dsgd_2"]
    print(f"dsgd 2 vs 1 worker: speedup {two['speedup']:.2f}x per epoch "
          f"({two['wall_speedup']:.2f}x wall), efficiency {two['efficiency']:.2f}, RMSE "
          f"{two['rmse_minus_one_worker']:+.4f}")  # fmt: skip
    print(f"\nwritten {RESULTS / 'funksvd.json'} and {RESULTS / 'funksvd_rmse.png'}")


if __name__ == "__main__":
    main()
