"""The fault rehearsals, injected into the rehearsed executions (so they cost no second run):
- every trainer's cluster (FunkSVD, XGBoost, the CNN, the CLIP classifier) loses a worker pod
  once its first checkpoint is on S3, and then its head (the attempt is lost): Flyte's next
  attempt, on a new cluster, must resume from the checkpoint (its report says from where);
- the MLflow server restarts a few seconds into the registration: the task's retries (and
  MLflow's client retries) must carry it through;
- Postgres restarts after the run: no registered version or alias may be lost.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from dataclasses import dataclass, field

from k8s.rehearse.flyte import DOMAIN, PROJECT, Row

REGISTER = "register_model"
MLFLOW_RESTART_AFTER = 5.0  # seconds into the registration's first attempt
CHECKPOINT_WATCH = 600.0  # seconds the trainer's first attempt is watched for a checkpoint
# What each trainer task checkpoints on S3 (FunkSVD's epoch folders; Ray Train registers a
# checkpoint in its snapshot), and where its report says it started: task -> (report module,
# class, the resumed-from field, how far it trained, the unit).
CHECKPOINTED = re.compile(r"/(epoch-\d+/state\.json|checkpoint_manager_snapshot\.json)$", re.M)
TRAINERS = {
    "fit_recommender": ("flyray.recsys.report", "TrainingReport", "resumed_from_epoch",
                    lambda r: r.epochs[-1], "epoch"),
    "fit_xgboost": ("flyray.tabular.train", "TrainingReport", "restored_from_round",
                    lambda r: r.rounds, "round"),
    "fit_cnn": ("flyray.vision.train", "RunReport", "resumed_from_epoch",
                lambda r: len(r.epoch_seconds), "epoch"),
    "fit_clip_classifier": ("flyray.clip.report", "TrainingReport", "resumed_from_epoch",
                            lambda r: r.epochs[-1], "epoch"),
}  # fmt: skip


@dataclass
class TrainerLoss:
    """A hook that loses the first attempt of `task` (its worker pod, then its head) as soon as
    its first checkpoint is on S3; `outcome` says where Flyte's next attempt started."""

    task: str
    lost_at: float = 0.0

    def __call__(self, execution, node, task, attempt, seconds, cluster) -> None:
        if task == self.task and attempt == 0 and cluster is not None and not self.lost_at:
            self._lose_at_first_checkpoint(execution, node, cluster, seconds)

    def _lose_at_first_checkpoint(self, execution, node, cluster, seconds) -> None:
        """Watch the node's checkpoint folder closely (epochs of a small run take well under a
        second) and lose the worker, then the head, as soon as a checkpoint is there."""
        checkpoints = (
            f"s3://{execution.store.bucket}/flyray-checkpoints/{PROJECT}/{DOMAIN}/"
            f"{execution.name}/{node}/"
        )
        began = time.monotonic()
        while time.monotonic() - began < CHECKPOINT_WATCH:
            if CHECKPOINTED.search("\n".join(execution.store.keys(checkpoints))):
                cluster.kill_worker(0)
                time.sleep(0.5)
                cluster.head.send(signal.SIGKILL)
                self.lost_at = seconds + time.monotonic() - began
                return
            if not cluster.head.alive():
                return
            time.sleep(0.1)

    def outcome(self, execution) -> Row:
        """Where Flyte's next attempt of the trainer started (its report)."""
        import importlib

        from flyteidl.core import literals_pb2
        from flytekit.core.context_manager import FlyteContextManager
        from flytekit.core.type_engine import TypeEngine
        from flytekit.models.literals import Literal

        module, name, resumed_field, trained, unit = TRAINERS[self.task]
        what = f"fault: worker + head of {self.task} killed"
        if not self.lost_at:
            return Row(what, "SIGKILL", 0, "FAILED: no checkpoint was seen")
        [node] = [r.node.split()[0] for r in execution.rows if r.node.endswith(self.task)]
        attempts = execution.store.keys(f"{execution.meta}/{node}/data/")
        done = sorted(k for k in attempts if k.endswith("/outputs.pb"))
        if not done:
            return Row(what, "SIGKILL", 0, "FAILED: no attempt finished")
        outputs = literals_pb2.LiteralMap.FromString(
            execution.store.get(f"s3://{execution.store.bucket}/{done[-1]}")
        )
        report = TypeEngine.to_python_value(
            FlyteContextManager.current_context(),
            Literal.from_flyte_idl(outputs.literals["report"]),
            getattr(importlib.import_module(module), name),
        )
        attempt = done[-1].split("/")[-2]
        resumed, end = getattr(report, resumed_field), trained(report)
        ok = attempt != "0" and 0 < resumed < end
        outcome = (
            f"killed at its first checkpoint on S3; attempt {attempt} resumed from {unit} "
            f"{resumed}, trained to {unit} {end}"
        )
        return Row(f"{what} at {self.lost_at:.0f} s", "SIGKILL, next attempt re-submitted", 0,
                   outcome if ok else f"FAILED: {outcome}")  # fmt: skip


@dataclass
class Faults:
    """The recommendation run's faults: its trainer lost, MLflow and Postgres restarted."""

    mlflow: object
    postgres: object
    trainer: TrainerLoss = field(default_factory=lambda: TrainerLoss("fit_recommender"))
    mlflow_restart: threading.Thread | None = None

    def __call__(self, execution, node, task, attempt, seconds, cluster) -> None:
        self.trainer(execution, node, task, attempt, seconds, cluster)
        restart = task == REGISTER and attempt == 0 and seconds >= MLFLOW_RESTART_AFTER
        if restart and self.mlflow_restart is None:
            self.mlflow_restart = threading.Thread(target=self.mlflow.restart, daemon=True)
            self.mlflow_restart.start()

    def mlflow_outcome(self, execution) -> Row:
        if self.mlflow_restart is None:
            return Row("fault: MLflow restarted", "restart", 0, "FAILED: registration too quick")
        self.mlflow_restart.join(timeout=300)
        [row] = [r for r in execution.rows if r.node.endswith(REGISTER)]
        return Row(
            f"fault: MLflow restarted {MLFLOW_RESTART_AFTER:.0f} s into {REGISTER}",
            "SIGTERM, same command",
            0,
            row.outcome,
        )

    def postgres_outcome(self, model: str) -> Row:
        """Versions and aliases of `model` before and after a Postgres restart."""
        before = self.mlflow.registry(model)
        began = time.monotonic()
        self.postgres.restart()
        after = self.mlflow.registry(model)
        same = before == after
        return Row(
            "fault: Postgres restarted",
            "SIGTERM, same volume",
            time.monotonic() - began,
            f"{'nothing lost' if same else 'LOST'}: {after}",
        )
