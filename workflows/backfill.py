"""`make backfill FROM=... TO=...`: the nightly retrain run for a range of past days.

    python -m workflows.backfill --from 2026-11-01 --to 2026-11-03 [--demo-events N]
                                 [--inputs '{"tuning": {"trials": 0}}']
    python -m workflows.backfill --from 2026-11-01 --to 2026-11-03 --remote -p flyray -d development

Locally: the `recommendation_nightly` launch plan, once per day, one day after another, with that
day's kickoff (03:00 UTC, the plan's schedule) as `run_date`, as `pyflyte run` would run it; each
version carries its own window in its lineage (`lineage.window.clickstream`); a table of the
versions last. `--remote`: Flyte's own launch-plan backfill (`pyflyte backfill`), which registers
a workflow running the plan for every scheduled kickoff in the range (serial unless
`--parallel`), on the cluster your Flyte config points at.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

KICKOFF_HOUR = 3  # the nightly plan's CronSchedule: "0 3 * * *"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="first", type=date.fromisoformat, required=True)
    parser.add_argument("--to", dest="last", type=date.fromisoformat, required=True)
    parser.add_argument("--demo-events", type=int, default=None,
                        help="demo events per window when the plan has no source")  # fmt: skip
    parser.add_argument("--inputs", default="{}", help="JSON: other inputs of the plan to set")
    parser.add_argument("--remote", action="store_true", help="Flyte's backfill on a cluster")
    parser.add_argument("-p", "--project", default="flyray")
    parser.add_argument("-d", "--domain", default="development")
    parser.add_argument("--parallel", action="store_true", help="remote: every day at once")
    args = parser.parse_args(argv)
    if args.last < args.first:
        parser.error(f"--to {args.last} is before --from {args.first}")
    try:
        args.inputs = json.loads(args.inputs)
    except json.JSONDecodeError as err:
        parser.error(f"--inputs: not JSON ({err})")
    if not isinstance(args.inputs, dict):
        parser.error("--inputs: expected a JSON object of input names")
    return args


def kickoffs(first: date, last: date) -> list[datetime]:
    """Every scheduled kickoff from `first` to `last`, both included."""
    days = (last - first).days + 1
    return [
        datetime(d.year, d.month, d.day, KICKOFF_HOUR, tzinfo=UTC)
        for d in (first + timedelta(n) for n in range(days))
    ]


def remote(args: argparse.Namespace) -> int:
    argv = [str(_pyflyte()), "backfill", "-p", args.project, "-d", args.domain,
            "--from-date", args.first.isoformat(), "--to-date", args.last.isoformat(),
            "--parallel" if args.parallel else "--serial", "recommendation_nightly"]  # fmt: skip
    print(" ".join(argv), flush=True)
    return subprocess.call(argv)


def _pyflyte():
    from pathlib import Path

    return Path(sys.executable).parent / "pyflyte"


def local(args: argparse.Namespace) -> list[dict]:
    from flyray import console
    from flyray.lineage import DataInput
    from tasks.recipe import typed_inputs
    from workflows.local import local_run
    from workflows.recommendation import nightly_plan, recommendation_pipeline

    console.configure()
    try:
        inputs = typed_inputs(recommendation_pipeline, args.inputs, "--inputs")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.demo_events is not None:
        inputs["demo_events"] = args.demo_events
    rows = []
    for kickoff in kickoffs(args.first, args.last):
        with local_run():
            out = nightly_plan(run_date=kickoff, **inputs)
        decision, registration = out.registration.decision, out.registration
        data = registration.lineage.get("lineage.data.clickstream", "")
        rows.append({
            "day": kickoff.date().isoformat(),
            "version": decision.version,
            "promoted": decision.promoted,
            "window": registration.lineage.get("lineage.window.clickstream", ""),
            "data": DataInput.read_tag(data)[1][:12],
            "drift": registration.drift_summary or "(no champion before)",
        })  # fmt: skip
        print(f"backfill {rows[-1]['day']}: version {decision.version} "
              f"({'champion' if decision.promoted else 'not promoted'})", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.remote:
        return remote(args)
    rows = local(args)
    print(f"\n{'day':<12}{'version':>8}  {'promoted':<9}{'data sha256':<14}window")
    for r in rows:
        print(
            f"{r['day']:<12}{r['version']:>8}  {str(r['promoted']):<9}{r['data']:<14}{r['window']}"
        )
    for r in rows:
        print(f"{r['day']}: {r['drift']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
