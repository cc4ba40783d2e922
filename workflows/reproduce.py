"""`make reproduce MODEL=<name> VERSION=<n>`: train a registered version again and compare.

    python -m workflows.reproduce --model flyray-xgboost --version 3 [--rtol 0.02] [--atol 0.001]

Reads the version's lineage (flyray.lineage): its workflow and inputs (the recipe), its commit
and its data digests. It refuses, naming what differs, when the recipe is missing, the commit is
not the one checked out here (or either has uncommitted changes), or a data input is gone or
changed. Otherwise it runs the same workflow with the recorded inputs as a local run, registered
under `<model>-reproduced` (the original model's versions and champion are left alone), then
prints the recorded and reproduced metrics side by side and exits 1 when one differs by more
than atol + rtol * |recorded|, or when the data digests differ. docs/platform.md#reproduce says
which trainers give the same numbers bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

from flyray.clickstream.schema import INPUT_SUFFIXES
from flyray.lineage import NotReproducible, Recorded, check_code, check_data, compare_metrics
from flyray.tabular.data import PARQUET_SUFFIXES

# Data inputs fingerprinted as a listing of files (flyray.storage.fingerprint), checked before
# the run; the others (image folders with a model) are compared on the reproduced version.
LISTED = {"clickstream": INPUT_SUFFIXES, "table": PARQUET_SUFFIXES}
SUFFIX = "-reproduced"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--version", required=True, help="its version number")
    parser.add_argument("--rtol", type=float, default=0.02, help="relative tolerance (0.02)")
    parser.add_argument("--atol", type=float, default=1e-3, help="absolute tolerance (0.001)")
    return parser.parse_args(argv)


def load(model: str, version: str) -> Recorded:
    import mlflow

    from flyray import registry
    from flyray.lineage import read_recorded

    return read_recorded(mlflow.MlflowClient(registry.tracking_uri()), model, version)


def planned(recorded: Recorded):
    """The recorded workflow and its typed inputs, registered under `<model>-reproduced`."""
    from tasks.recipe import typed_inputs

    path = recorded.recipe["workflow"]
    module, _, name = path.rpartition(".")
    try:
        workflow = getattr(importlib.import_module(module), name)
        inputs = typed_inputs(workflow, recorded.recipe["inputs"], "the recipe")
    except (ImportError, AttributeError, ValueError) as err:
        raise NotReproducible(f"the recorded workflow {path} does not run here: {err}") from None
    config = inputs.get("registration")
    if config is not None:
        inputs["registration"] = dataclasses.replace(config, model_name=recorded.model + SUFFIX)
    return workflow, inputs


def report(recorded: Recorded, reproduced: dict[str, float], args) -> bool:
    rows = compare_metrics(recorded.metrics, reproduced, args.rtol, args.atol)
    print(f"\n{'metric':<36}{'recorded':>12}{'reproduced':>12}{'difference':>12}  within")
    for key, a, b, ok in rows:
        diff = "" if b is None else f"{b - a:+.2e}" if b != a else "identical"
        shown = "missing" if b is None else f"{b:.6g}"
        print(f"{key:<36}{a:>12.6g}{shown:>12}{diff:>12}  {'yes' if ok else 'NO'}")
    identical = sum(1 for _, a, b, _ in rows if a == b)
    print(f"{identical} of {len(rows)} metrics identical; tolerance atol {args.atol} + "
          f"rtol {args.rtol} x |recorded|")  # fmt: skip
    return all(ok for *_, ok in rows)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from flyray import console
    from tasks.deployment import current
    from workflows.local import local_run

    console.configure()
    try:
        recorded = load(args.model, args.version)
        check_code(recorded, current().code_version)
        checked = check_data(recorded, LISTED)
        workflow, inputs = planned(recorded)
    except NotReproducible as err:
        print(f"make reproduce: cannot reproduce: {err}", file=sys.stderr)
        return 2
    print(f"reproducing {args.model} version {args.version}: {recorded.recipe['workflow']} at "
          f"commit {recorded.tags['lineage.commit'][:12]} (run {recorded.run_id})")  # fmt: skip
    for line in checked:
        print(f"  data {line}")
    os.environ["FLYTE_LOCAL_CACHE_ENABLED"] = "false"  # every task runs again: none is cached
    with local_run():
        registration = workflow(**inputs).registration
    again = load(args.model + SUFFIX, registration.decision.version)
    print(f"reproduced as {args.model}{SUFFIX} version {again.version} (run {again.run_id})")
    same_data = [d[::2] for d in recorded.data()] == [d[::2] for d in again.data()]
    for (name, _, before), (_, _, after) in zip(recorded.data(), again.data(), strict=False):
        print(f"  data {name}: sha256 {before[:12]} recorded, {after[:12]} reproduced")
    within = report(recorded, again.metrics, args)
    if not same_data:
        print("the reproduced run read other data: its metrics do not compare", file=sys.stderr)
    return 0 if within and same_data else 1


if __name__ == "__main__":
    sys.exit(main())
