"""`make run`: the main job on the embedded defaults, then where to find everything.

python -m workflows.run_local [--demo-events N] [--source PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flytekit.core.context_manager import FlyteContextManager

from workflows.recommendation import recommendation_pipeline

_DECKS = ("ingest", "data profile", "training", "evaluation", "registry")


def _decks(since: float) -> list[tuple[str, Path]]:
    """(deck name, file) of the deck files this run wrote."""
    root = Path(FlyteContextManager.current_context().file_access.local_sandbox_dir)
    found = []
    for path in sorted(root.rglob("deck.html")):
        if path.stat().st_mtime >= since:
            text = path.read_text(errors="replace")
            # Local runs share one deck list, so a task's own tab is the last one in its file.
            marks = {d: text.rfind(f'handleLinkClick(this)">{d}</li>') for d in _DECKS}
            tab = max(marks, key=marks.get) if max(marks.values()) >= 0 else "deck"
            found.append((tab, path))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-events", type=int, default=1_000_000)
    parser.add_argument("--source", default="", help="clickstream file, dir, glob or s3:// URI")
    args = parser.parse_args()
    began = time.time()
    out = recommendation_pipeline(source=args.source, demo_events=args.demo_events)
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
    status = "now the champion" if decision.promoted else "not promoted"
    print(f"\nregistered: {decision.model_name} version {decision.version} ({status}): "
          f"{decision.reason}")  # fmt: skip
    print(f"MLflow run {reg.run_id}; UI: mlflow ui --backend-store-uri {reg.tracking_uri}")
    print(f"model files: {out.model.path}")
    print(f"recommendations (parquet): {out.recommendations.literal.uri}")
    for name, path in _decks(began):
        print(f"deck ({name}): {path}")


if __name__ == "__main__":
    main()
