"""Benchmark: recommendation quality side by side, on the pipeline's own split and evaluation.

    python -m bench.recsys [--events 1000000 10000000] [--trials 12] [--budget 240]

Each dataset goes through the pipeline's ingest and features (train / validation / test split
per user in time); every model trains on train, picks its hyperparameters on validation, and is
scored on test exactly as the pipeline's evaluation does (NDCG, recall and catalogue coverage at
10 over the full catalogue, 20,000 sampled test users, training items excluded):

- popularity: items by training interactions;
- flyray FunkSVD and iALS, with the pipeline's parameters and tuned by flyray.recsys.tuning
  (Ray Tune; fit seconds are the final training's, the search's own time in `tune s`);
- implicit's ALS and BPR (the library a practitioner would pick), a small grid of their
  hyperparameters, the grid point best on validation; and flyray's iALS over implicit's ALS
  grid, chosen the same way (the implementations compared under one search);
- on generated data, the oracle: every item scored by log popularity + user . item taste, from
  the ground truth written beside the events (the ceiling a model of this data can approach).

Every model has the same number of factors. Datasets: the generated demo at each --events size
and the real samples in ../shared/data/clickstream (skipped when absent). Prints a table per
dataset and writes bench/results/recsys.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import ray
import scipy.sparse as sp

from flyray import storage
from flyray.clickstream.config import FeatureConfig, IngestConfig
from flyray.clickstream.features import build_features
from flyray.clickstream.generate import GeneratorConfig, generate
from flyray.clickstream.ingest import ingest
from flyray.raytrain import DistributedConfig
from flyray.recsys import FactorModel, FunkSVDParams, baselines, distributed, ials
from flyray.recsys.evaluate import evaluate, ndcg_per_user, ndcg_with_error
from flyray.recsys.ials import IALSParams
from flyray.recsys.model import Ratings
from flyray.recsys.tuning import TuningConfig, tune_recommender
from workflows.recommendation import IALS_PARAMS, PIPELINE_PARAMS

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".data" / "bench"
REAL = REPO.parent / "shared" / "data" / "clickstream"
RESULTS = REPO / "bench" / "results"
K, USERS = 10, 20_000
SMALL = 5_000  # test users under which trained rows average several seeds


def prepare(name: str, source: Path) -> dict:
    """The pipeline's ingest and features on `source`, cached under .data/bench/recsys-<name>."""
    work = DATA / f"recsys-{name}"
    features = work / "features"
    if not (features / "profile.json").exists():
        if not ray.is_initialized():
            ray.init()
        report = ingest(str(source), str(work / "events"), IngestConfig())
        build_features(report.events_uri, str(features), FeatureConfig(), report)
    splits = {}
    for split in ("train", "validation", "test"):
        table = storage.read_table(str(features / split), ["user_idx", "item_idx", "rating"])
        splits[split] = Ratings(*(table[c].to_numpy() for c in ("user_idx", "item_idx", "rating")))
    ids = {
        n: storage.read_table(str(features / "id_maps" / f"{n}.parquet"))
        for n in ("users", "items")
    }
    splits["user_ids"] = ids["users"]["user_id"].to_numpy()
    splits["item_ids"] = ids["items"]["item_id"].to_numpy()
    return splits


def factor_model(P: np.ndarray, Q: np.ndarray, train: Ratings, name: str) -> FactorModel:
    """Factors that rank by their dot product, in the files and scorer every model uses."""
    model = FactorModel.empty(np.arange(len(P)), np.arange(len(Q)), P.shape[1],
                              trainer={"name": name, "params": {}})  # fmt: skip
    model.P, model.Q = np.ascontiguousarray(P, np.float32), np.ascontiguousarray(Q, np.float32)
    return model.set_seen(train.users, train.items)


def oracle(data: dict, truth: Path) -> FactorModel:
    """The generator's truth: log popularity + user . item taste (ids are truth rows + 1)."""
    t = np.load(truth)
    users, items = data["user_ids"] - 1, data["item_ids"] - 1
    P = np.hstack([t["user_factors"][users], np.ones((len(users), 1))])
    Q = np.hstack([t["item_factors"][items], np.log(t["item_popularity"][items])[:, None]])
    return factor_model(P, Q, data["train"], "oracle")


def implicit_grid(data: dict, n_users: int, n_items: int, factors: int, seeds: int) -> list:
    """implicit's ALS and BPR over a small grid, and flyray's iALS over implicit's ALS grid (the
    same search on both implementations); each one's best point on validation (seed 0), scored
    on test over `seeds` seeds."""
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    train = data["train"]
    matrix = sp.csr_matrix((train.values, (train.users, train.items)), (n_users, n_items))

    def library(cls, **fixed):
        def fit(seed: int, params: dict):
            algo = cls(factors=factors, random_state=seed, **fixed, **params)
            began = time.perf_counter()
            algo.fit(matrix, show_progress=False)
            seconds = time.perf_counter() - began
            return factor_model(algo.user_factors, algo.item_factors, train, "implicit"), seconds

        return fit

    def flyray_ials(seed: int, params: dict):
        ials_params = IALSParams(n_factors=factors, n_epochs=15, seed=seed,
                                 reg=params["regularization"], alpha=params["alpha"])  # fmt: skip
        began = time.perf_counter()
        model = ials.train(train, n_users, n_items, ials_params, DistributedConfig(workers=2))
        return model, time.perf_counter() - began

    als_grid = {"regularization": [0.01, 0.1, 1.0], "alpha": [1.0, 10.0]}
    grids = {
        "implicit ALS": (library(AlternatingLeastSquares, iterations=15), als_grid),
        "implicit BPR": (library(BayesianPersonalizedRanking, iterations=100),
                         {"learning_rate": [0.01, 0.05], "regularization": [0.01, 0.001]}),
        "flyray ials (implicit's grid)": (flyray_ials, als_grid),
    }  # fmt: skip
    rows = []
    for name, (fit, grid) in grids.items():
        best = None
        for values in itertools.product(*grid.values()):
            params = dict(zip(grid, values, strict=True))
            first = fit(0, params)
            score = ndcg_with_error(first[0], data["validation"], K, USERS)[0]
            if best is None or score > best[0]:
                best = (score, params, first)
        score, params, first = best
        rows.append(_row(name, _reuse(first, lambda seed, p=params, f=fit: f(seed, p)), data,
                         seeds, params, validation=score))  # fmt: skip
    return rows


def _row(name, fit, data, seeds, params, validation=None, tune_s=None) -> dict:
    """Test metrics of `fit(seed) -> (model, seconds)`, averaged over seeds 0..seeds-1 (the
    spread of NDCG over seeds in `ndcg sd`): on a few hundred test users one seed's luck moves
    NDCG@10 by more than the gap between the models. With several seeds the row also keeps
    each test user's NDCG (seed-averaged) for `paired`."""
    runs, per_user = [], []
    for seed in range(seeds):
        model, seconds = fit(seed)
        m = evaluate(model, data["test"], K, name, rating_metrics=False, max_users=USERS)
        runs.append((m.ndcg, m.recall, m.coverage, seconds))
        if seeds > 1:
            per_user.append(ndcg_per_user(model, data["test"], K, USERS))
    ndcg, recall, coverage, seconds = np.mean(runs, axis=0)
    row = {"model": name, "ndcg@10": ndcg, "ndcg sd": np.std([r[0] for r in runs]),
           "recall@10": recall, "coverage@10": coverage, "fit s": seconds, "tune s": tune_s,
           "validation ndcg@10": validation, "seeds": seeds, "params": params}  # fmt: skip
    if per_user:
        row["_per_user"] = np.mean(per_user, axis=0)
    return row


def paired(rows: list[dict]) -> dict:
    """flyray's best row against implicit's best, user by user on the same test split: the mean
    difference of NDCG@10 and its standard error. Small test splits cannot tell close models
    apart by their means alone; the paired difference says whether the gap is more than luck."""

    def best(prefix: str) -> dict:
        return max((r for r in rows if r["model"].startswith(prefix)), key=lambda r: r["ndcg@10"])

    ours, theirs = best("flyray"), best("implicit")
    diff = ours["_per_user"] - theirs["_per_user"]
    mean, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))
    return {"flyray": ours["model"], "implicit": theirs["model"], "users": len(diff),
            "difference": mean, "se": se,
            "95% interval": [mean - 1.96 * se, mean + 1.96 * se]}  # fmt: skip


def _fixed(model: FactorModel) -> Callable[[int], tuple[FactorModel, float]]:
    """A deterministic model as a `fit` for `_row`."""
    return lambda seed: (model, 0.0)


def _reuse(first: tuple, fit: Callable) -> Callable:
    """`fit` with seed 0's (model, seconds) already at hand: it is not trained again."""
    return lambda seed: first if seed == 0 else fit(seed)


def flyray_rows(data: dict, n_users: int, n_items: int, trials: int, budget: float,
                seeds: int) -> list:  # fmt: skip
    """FunkSVD and iALS with the pipeline's parameters, then tuned (fixed factor count)."""
    train, config = data["train"], DistributedConfig(workers=2)
    rows = []

    def fitter(model: str, funksvd: FunkSVDParams, ials_params: IALSParams):
        def fit(seed: int):
            began = time.perf_counter()
            if model == "ials":
                fitted = ials.train(train, n_users, n_items, replace(ials_params, seed=seed),
                                    config)  # fmt: skip
            else:
                fitted = distributed.train(train, n_users, n_items, replace(funksvd, seed=seed),
                                           config)  # fmt: skip
            return fitted, time.perf_counter() - began

        return fit

    for model in ("funksvd", "ials"):
        fit = fitter(model, PIPELINE_PARAMS, IALS_PARAMS)
        params = asdict(PIPELINE_PARAMS if model == "funksvd" else IALS_PARAMS)
        first = fit(0)
        score = ndcg_with_error(first[0], data["validation"], K, USERS)[0]
        rows.append(_row(f"flyray {model} (defaults)", _reuse(first, fit), data, seeds, params,
                         score))  # fmt: skip
        if not trials:
            continue
        factors = PIPELINE_PARAMS.n_factors
        tuning = TuningConfig(trials=trials, time_budget_s=budget,
                              space=json.dumps({model: {"n_factors": [factors]}}))  # fmt: skip
        ials_start = replace(IALS_PARAMS, n_factors=factors)
        tuned = tune_recommender(train, data["validation"], n_users, n_items, model,
                                 PIPELINE_PARAMS, ials_start, tuning)  # fmt: skip
        params = asdict(tuned.funksvd if model == "funksvd" else tuned.ials)
        rows.append(_row(f"flyray {model} (tuned)", fitter(model, tuned.funksvd, tuned.ials),
                         data, seeds, params, tuned.report.best_score,
                         tuned.report.seconds))  # fmt: skip
    return rows


def run(name: str, source: Path, truth: Path | None, trials: int, budget: float,
        with_implicit: bool = True, seeds: int = 5) -> dict:  # fmt: skip
    """Every row on one dataset; trained rows average `seeds` seeds where the test split has
    fewer than SMALL users (one seed otherwise: there the spread is far below the gaps)."""
    began = time.perf_counter()
    data = prepare(name, source)
    n_users, n_items = len(data["user_ids"]), len(data["item_ids"])
    train = data["train"]
    seeds = seeds if len(np.unique(data["test"].users)) < SMALL else 1
    pop = baselines.popularity(train, n_users, n_items)
    rows = [_row("popularity", _fixed(pop), data, 1, {})]
    rows += flyray_rows(data, n_users, n_items, trials, budget, seeds)
    if with_implicit:
        rows += implicit_grid(data, n_users, n_items, PIPELINE_PARAMS.n_factors, seeds)
    if truth is not None and truth.exists():
        rows.append(_row("oracle (generator truth)", _fixed(oracle(data, truth)), data, 1, {}))
    pop = rows[0]["ndcg@10"]
    for row in rows:
        row["x popularity"] = row["ndcg@10"] / pop if pop else float("nan")
    info = {"dataset": name, "users": n_users, "items": n_items, "train": len(train),
            "test users": len(np.unique(data["test"].users)),
            "seconds": time.perf_counter() - began}  # fmt: skip
    if seeds > 1 and with_implicit:
        info["flyray vs implicit"] = paired(rows)
    return {**info, "rows": [{k: v for k, v in row.items() if k != "_per_user"} for row in rows]}


def ials_scaling(n_ratings: int, factors: int, iterations: int = 4) -> dict:
    """Seconds per iALS iteration on 1 and 2 Ray workers, on n_ratings generated clicks
    (median over iterations after the first, which includes compilation and start-up)."""
    rng = np.random.default_rng(0)
    n_users, n_items = n_ratings // 25, max(1000, n_ratings // 100)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.9
    pairs = np.unique(rng.integers(0, n_users, int(n_ratings * 1.05)).astype(np.int64) * n_items
                      + rng.choice(n_items, int(n_ratings * 1.05), p=pop / pop.sum()))  # fmt: skip
    pairs = pairs[:n_ratings]
    ratings = Ratings(pairs // n_items, pairs % n_items, rng.uniform(1, 5, len(pairs)))
    params = replace(IALS_PARAMS, n_factors=factors, n_epochs=iterations)
    out = {"ratings": len(ratings), "users": n_users, "items": n_items, "factors": factors}
    for workers in (1, 2):
        model = ials.train(ratings, n_users, n_items, params, DistributedConfig(workers=workers))
        out[f"{workers} worker s/iteration"] = float(
            np.median([h.seconds for h in model.history[1:]])
        )
    out["speed-up"] = out["1 worker s/iteration"] / out["2 worker s/iteration"]
    print(f"\n### iALS seconds per iteration, {len(ratings):,} ratings, {factors} factors\n")
    print("| workers | s/iteration |\n|---|---|")
    for workers in (1, 2):
        print(f"| {workers} | {out[f'{workers} worker s/iteration']:.2f} |")
    print(f"\nspeed-up {out['speed-up']:.2f}x")
    return out


def _print(result: dict) -> None:
    print(
        f"\n### {result['dataset']}: {result['users']:,} users, {result['items']:,} items, "
        f"{result['train']:,} training ratings, {result['test users']:,} test users\n"
    )
    columns = [c for c in result["rows"][0] if c != "params"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in result["rows"]:
        cells = (f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)
                 for v in (row[c] for c in columns))  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    if "flyray vs implicit" in result:
        p = result["flyray vs implicit"]
        print(f"\n{p['flyray']} - {p['implicit']}, NDCG@10 paired over {p['users']:,} test users: "
              f"{p['difference']:+.4f} (standard error {p['se']:.4f}, 95% interval "
              f"{p['95% interval'][0]:+.4f} to {p['95% interval'][1]:+.4f})")  # fmt: skip


def _save(path: Path, name: str, result: dict) -> None:
    """`result` under `name` in the results file, the other entries as they are on disk now (runs
    for different datasets may overlap), written whole or not at all after every dataset."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = result
    data = json.dumps(results, indent=2, default=str).encode()
    storage.write_atomic(storage.filesystem(str(path))[0], str(path.absolute()), data)


def datasets(events: list[int], only: str = "") -> list[tuple[str, Path, Path | None]]:
    """(name, events file, generator truth or None) of each dataset whose name contains `only`;
    demo events are generated on first use."""
    out = []
    for n in events:
        name = f"demo-{n / 1e6:g}M"
        source = DATA / f"events-{n}.jsonl"  # the same file as bench.pipeline
        if only not in name:
            continue
        if not source.exists():
            DATA.mkdir(parents=True, exist_ok=True)
            generate(source, GeneratorConfig(n_events=n, seed=0))
        out.append((name, source, source.with_name(source.stem + ".truth.npz")))
    if REAL.is_dir():
        real = [(f"real-{p.stem}", p, None) for p in sorted(REAL.glob("*.csv"))]
        out += [d for d in real if only in d[0]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--trials", type=int, default=12, help="tuning trials per model (0: off)")
    parser.add_argument("--budget", type=float, default=240, help="tuning seconds per model")
    parser.add_argument("--only", default="", help="run datasets whose name contains this")
    parser.add_argument(
        "--seeds",
        type=int,
        default=5,
        help=f"seeds averaged on datasets with under {SMALL:,} test users",
    )
    parser.add_argument("--skip-implicit", action="store_true", help="no implicit ALS/BPR grid")
    parser.add_argument("--scaling-ratings", type=int, default=5_000_000,
                        help="iALS 1 vs 2 workers on this many ratings (0: skip)")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(include_dashboard=False, log_to_driver=False)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "recsys.json"
    for name, source, truth in datasets(args.events, args.only):
        result = run(
            name, source, truth, args.trials, args.budget, not args.skip_implicit, args.seeds
        )
        _print(result)
        _save(path, name, result)
    if args.scaling_ratings:
        _save(path, "ials scaling", ials_scaling(args.scaling_ratings, PIPELINE_PARAMS.n_factors))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
