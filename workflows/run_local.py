"""`make run`: the main job on the embedded defaults, then a summary of what it made.

python -m workflows.run_local [--demo-events N] [--source PATH] [--tune-trials N] [--verbose]
"""

from __future__ import annotations

import argparse
import os
import time


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-events", type=int, default=1_000_000)
    parser.add_argument("--source", default="", help="clickstream file, dir, glob or s3:// URI")
    parser.add_argument(
        "--tune-trials", type=int, default=None, help="Ray Tune trials before training (0: off)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="every library's output too (FLYRAY_LOG_LEVEL=DEBUG)"
    )
    return parser.parse_args()


def main() -> None:
    args = _parse()
    if args.verbose:  # before flyray is imported: it quiets Ray and MLflow unless DEBUG
        os.environ["FLYRAY_LOG_LEVEL"] = "DEBUG"
    from flyray import console, ui
    from flyray.recsys.tuning import TuningConfig
    from workflows.local import local_run
    from workflows.recommendation import recommendation_pipeline

    console.configure()
    began = time.time()
    tuning = {} if args.tune_trials is None else {"tuning": TuningConfig(trials=args.tune_trials)}
    with local_run():
        out = recommendation_pipeline(source=args.source, demo_events=args.demo_events, **tuning)
    seconds = time.time() - began
    reg, ev = out.registration, out.evaluation
    decision = reg.decision
    k = ev.k
    print(f"\n=== recommendation_pipeline finished in {seconds:.0f} s ===")
    print(f"\n{'model':<12}{'RMSE':>8}{'MAE':>8}{f'P@{k}':>8}{f'R@{k}':>8}{f'NDCG@{k}':>9}"
          f"{f'MAP@{k}':>8}{'coverage':>10}")  # fmt: skip
    for m in (ev.model, ev.biases, ev.popularity):
        print(f"{m.model:<12}{m.rmse:>8.3f}{m.mae:>8.3f}{m.precision:>8.4f}{m.recall:>8.4f}"
              f"{m.ndcg:>9.4f}{m.map:>8.4f}{m.coverage:>10.3f}")  # fmt: skip
    tuned = out.tuning
    if tuned.table:
        print(f"\ntuning: {tuned.trials} Ray Tune trials in {tuned.seconds:.0f} s, "
              f"{tuned.best_model} at validation {tuned.metric} {tuned.best_score:.4f}: "
              f"{tuned.decision}")  # fmt: skip
    status = "now the champion" if decision.promoted else "not promoted"
    print(f"\nregistered: {decision.model_name} version {decision.version} ({status}): "
          f"{decision.reason}")  # fmt: skip
    if reg.drift_summary:
        print(reg.drift_summary)
    print(f"MLflow run {reg.run_id} in {reg.tracking_uri}")
    print(f"model files: {out.model.path}")
    print(f"recommendations (parquet): {out.recommendations.literal.uri}")
    decks = ui.latest_decks(since=began)
    print(f"decks ({', '.join(d.tab for d in decks)}): {ui.write_index(decks).as_uri()}")
    print(f"full log: {console.log_path()}")
    print("look at it all: make ui")


if __name__ == "__main__":
    main()
