"""`make rehearse`: the cluster path run for real on this machine (docs/cluster.md).

    python -m k8s.rehearse [--archive dist/flyray-flyte.tgz] [--keep] [--no-faults]
                           [--all-trainer-faults] [--workloads recommendation,xgboost,cnn,clip]

In a network namespace of its own whose /etc/hosts names the cluster's Services, it starts the
platform of k8s/ from its rendered manifests (Postgres, MinIO, MLflow), then runs the
recommendation workflow that `make package` serialized node by node, every Ray task as the
RayJob Flyte's Ray plugin creates on a Ray cluster of its own, checks what it registered
through MLflow's Service name, what each MLflow identity may do there (authentication is on),
and serves it with the RayService; then the training node of
every other workload. The FunkSVD trainer loses its first attempt at its first checkpoint
(with --all-trainer-faults every trainer does, each training longer so that the loss lands
mid-training). One line per node as it ends, a summary table last. Needs root (unshare,
Postgres); exit status 1 when any step fails.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from k8s import render
from k8s.rehearse.pods import (
    STARTED,
    Hosts,
    Objects,
    RehearsalError,
    enter_namespace,
    inside_namespace,
    leftovers,
    mount_hosts,
)

REPO = Path(__file__).resolve().parents[2]
# The recommendation run rehearsed: the default launch plan with a smaller demo window and
# ranking sample, so that the whole rehearsal fits a CI run (recommendation_inputs).
RECOMMENDATION = "workflows.recommendation.recommendation_pipeline"
MODEL = "flyray-funksvd"  # what it registers (the workflow's default RegistryConfig)
# The training node of each other workload, with the nodes whose outputs it needs, on its launch
# plan's defaults (the demo inputs each generates) made smaller: workflow, launch plan, training
# task, trainer, overrides, and the overrides that make it train long enough for a loss at its
# first checkpoint to land mid-training (--all-trainer-faults). A dataclass override is
# (module, class, fields).
_RAY = "flyray.raytrain"
TRAINING = {
    "xgboost": ("workflows.tabular.xgboost_pipeline", "xgboost_default", "train_xgboost",
     "fit_xgboost",
     {"params": ("flyray.tabular.train", "XGBParams", {"num_boost_round": 30})},
     {"params": ("flyray.tabular.train", "XGBParams",
                 {"num_boost_round": 400, "eta": 0.02, "early_stopping_rounds": 0}),
      "training": (_RAY, "DistributedConfig", {"checkpoint_every": 10})}),
    "cnn": ("workflows.image_classification.cnn_benchmark", "cnn_benchmark_default",
     "train_distributed", "fit_cnn",
     {"params": ("flyray.vision.model", "CNNParams", {"epochs": 1})},
     {"params": ("flyray.vision.model", "CNNParams", {"epochs": 4})}),
    "clip": ("workflows.clip.clip_pipeline", "clip_default", "train_clip_classifier",
     "fit_clip_classifier",
     {"demo_per_class": 20,
      "params": ("flyray.clip.classifier", "ClassifierParams", {"epochs": 3})},
     {"demo_per_class": 20,
      "params": ("flyray.clip.classifier", "ClassifierParams", {"epochs": 12})}),
}  # fmt: skip
WORKLOADS = ("recommendation", *TRAINING)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=REPO / "dist" / "flyray-flyte.tgz")
    parser.add_argument("--keep", action="store_true", help="keep the rehearsal's folder")
    parser.add_argument("--demo-events", type=int, default=30_000)
    parser.add_argument("--no-faults", action="store_true", help="skip the fault rehearsals")
    parser.add_argument("--all-trainer-faults", action="store_true",
                        help="lose every trainer's first attempt, not only FunkSVD's")  # fmt: skip
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS),
        help=f"comma-separated, of {', '.join(WORKLOADS)} (the RayService comes with "
        "recommendation, whose champion it serves)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"--workloads: unknown {sorted(unknown)}; expected some of {WORKLOADS}")
    return args


def deployment_secrets() -> dict[str, str]:
    """Fresh values for every secret the manifests take (never printed, gone with the run)."""
    return {name: secrets.token_hex(16) for name in render.SECRETS}


def recommendation_inputs(plan, demo_events: int):
    """The default launch plan's inputs, smaller. Tuning's Ray job runs without trials, so the
    trainer runs the pipeline's parameters (25 epochs, a few seconds here) and the lost-trainer
    fault lands mid-training."""
    from flyray.recsys.tuning import TuningConfig
    from k8s.rehearse.flyte import launch_inputs, literals
    from workflows.recommendation import recommendation_pipeline

    overrides = {
        "demo_events": demo_events,
        "ranking_users": 2_000,
        "tuning": TuningConfig(trials=0),
    }
    return launch_inputs(plan, literals(overrides, recommendation_pipeline.python_interface.inputs))


def training_inputs(plan, workflow: str, overrides: dict):
    """A launch plan's inputs with `overrides`; a dataclass override is (module, class, fields)."""
    import importlib

    from k8s.rehearse.flyte import launch_inputs, literals

    module, name = workflow.rsplit(".", 1)
    entity = getattr(importlib.import_module(module), name)
    values = {
        k: getattr(importlib.import_module(v[0]), v[1])(**v[2]) if isinstance(v, tuple) else v
        for k, v in overrides.items()
    }
    return launch_inputs(plan, literals(values, entity.python_interface.inputs))


def recommendation(args, package, store, objects, hosts, root, mlflow, postgres, rows) -> bool:
    """The recommendation workflow, all of it, with its faults; True when it failed."""
    from k8s.rehearse.faults import Faults
    from k8s.rehearse.flyte import Execution, NodeFailed, Row

    faults = None if args.no_faults else Faults(mlflow, postgres)
    execution = Execution(package, store, objects, hosts, root, RECOMMENDATION, hook=faults)
    inputs = recommendation_inputs(package.launch_plans["recommendation_default"], args.demo_events)
    failed = False
    try:
        execution.run(inputs)
    except NodeFailed as err:
        failed = True
        print(f"rehearse: {err}", file=sys.stderr)
    rows += execution.rows
    if failed:
        return True
    began = time.monotonic()
    found = mlflow.registry(MODEL)
    where = "MLflow over Postgres, by Service name"
    rows.append(Row(f"registry: {MODEL}", where, time.monotonic() - began, found))
    if faults is not None:
        rows += [
            faults.trainer.outcome(execution),
            faults.mlflow_outcome(execution),
            faults.postgres_outcome(MODEL),
        ]
    rows += identity_rows(mlflow)
    return False


def identity_rows(mlflow) -> list:
    """What each MLflow identity was allowed and refused (k8s/rehearse/identities.py), asked of
    the server by its Service name with the passwords of the rendered Secrets."""
    from k8s.rehearse import identities
    from k8s.rehearse.flyte import Row

    began = time.monotonic()
    checks = identities.check(mlflow.uri, mlflow.passwords(), MODEL)
    seconds = (time.monotonic() - began) / len(checks)
    return [
        Row(
            f"{c.identity}: {c.action}",
            f"MLflow as {c.identity}",
            seconds,
            c.outcome if c.passed else f"FAILED: expected {c.expected}, {c.outcome}",
        )
        for c in checks
    ]


def training(args, workload, package, store, objects, hosts, root, rows) -> bool:
    """A workload's training node and what it needs, its trainer lost once; True when failed."""
    from k8s.rehearse.faults import TrainerLoss
    from k8s.rehearse.flyte import Execution, NodeFailed, Row

    workflow, plan, task, trainer, quick, faulted = workload
    lose = args.all_trainer_faults and not args.no_faults
    loss, overrides = (TrainerLoss(trainer), faulted) if lose else (None, quick)
    run = Execution(package, store, objects, hosts, root, workflow, hook=loss)
    try:
        run.run(training_inputs(package.launch_plans[plan], workflow, overrides), task)
    except NodeFailed as err:
        print(f"rehearse: {err}", file=sys.stderr)
        rows += run.rows
        return True
    rows += run.rows
    if loss is not None:
        rows.append(loss.outcome(run))
    if "resolve_images" in run.outputs:  # where every CLIP actor loaded its model from
        model = run.outputs["resolve_images"].literals["model"].scalar.primitive
        rows.append(Row("clip model", "resolve_images' output", 0.0, model.string_value))
    return False


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if not inside_namespace():  # the package registry is not reachable from inside
        from k8s.rehearse.stack import install_postgres

        print(f"postgres: {install_postgres()}", flush=True)
    enter_namespace(argv)
    if not args.archive.exists():
        print(f"rehearse: {args.archive} is missing: run `make package` first", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="frh-", dir="/tmp"))  # short: Ray's socket paths
    root.chmod(0o755)  # the postgres user reaches its data folder through it
    from k8s.rehearse import serve
    from k8s.rehearse.flyte import Package, Row, Store
    from k8s.rehearse.raycluster import wait_deleted
    from k8s.rehearse.stack import MinIO, MLflow, Postgres

    hosts = Hosts(root / "hosts")
    mount_hosts(hosts.path)
    env = deployment_secrets()
    manifests = [*render.PLATFORM, "ray/raycluster.yaml", "ray/rayservice.yaml"]
    objects = Objects(render.render([REPO / "k8s" / f for f in manifests], env=env))
    rows: list[Row] = []
    postgres = Postgres(objects, hosts, root / "postgres")
    minio = MinIO(objects, hosts, root / "minio")
    mlflow = MLflow(objects, hosts, root / "mlflow")
    failed = False
    try:
        for part in (postgres, minio, mlflow):
            began = time.monotonic()
            part.start()
            rows.append(
                Row(
                    type(part).__name__.lower(),
                    "process (its manifest's command)",
                    time.monotonic() - began,
                    "ready",
                )
            )
        began = time.monotonic()
        mlflow.check_api()
        rows.append(Row("mlflow API by Service name", "HTTP", time.monotonic() - began, "200"))
        package = Package(args.archive)
        store = Store(
            minio.client(env["FLYRAY_S3_ACCESS_KEY"], env["FLYRAY_S3_SECRET_KEY"]), minio.bucket
        )
        chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
        if "recommendation" in chosen:
            failed = recommendation(
                args, package, store, objects, hosts, root, mlflow, postgres, rows
            )
            if not failed:
                rows += serve.rehearse(objects, hosts, root, MODEL)
        for workload in chosen:
            if workload in TRAINING:
                failed |= training(
                    args, TRAINING[workload], package, store, objects, hosts, root, rows
                )
        failed = failed or any(r.outcome.startswith(("FAILED", "LOST")) for r in rows)
    except RehearsalError as err:
        failed = True
        print(f"rehearse: {err}", file=sys.stderr)
    finally:
        wait_deleted()
        for part in (mlflow, minio, postgres):
            part.stop()
        rows.append(deleted_row())
        failed |= rows[-1].outcome.startswith("FAILED")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_table(rows)
    print(json.dumps({"failed": failed, "rows": len(rows)}))
    return 1 if failed else 0


def deleted_row():
    """Whether every pod, once deleted, left no process behind (as a container's every process
    ends with it); what one left is killed, so that nothing outlives the rehearsal."""
    from k8s.rehearse.flyte import Row

    left = leftovers()
    for process in left:
        process.send(signal.SIGKILL)
    outcome = (f"FAILED: processes left by {', '.join(p.name for p in left)}" if left
               else f"no process left by {len(STARTED)} pods")  # fmt: skip
    return Row("pods deleted", "each pod's session", 0.0, outcome)


def print_table(rows) -> None:
    width = max([len(r.node) for r in rows] + [4])
    how = max([len(r.how) for r in rows] + [3])
    print(f"\n{'node':<{width}}  {'how it ran':<{how}}  {'seconds':>7}  outcome")
    for r in rows:
        print(f"{r.node:<{width}}  {r.how:<{how}}  {r.seconds:>7.1f}  {r.outcome}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
