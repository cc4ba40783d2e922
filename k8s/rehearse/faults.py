"""The fault rehearsals, injected into the one rehearsed execution (so they cost no second run):
- the FunkSVD trainer's cluster loses a worker pod once its first checkpoint is on S3, and then
  its head (the attempt is lost): Flyte's next attempt, on a new cluster, must resume from the
  checkpoint (its TrainingReport says from which epoch);
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

TRAINER, REGISTER = "fit_funksvd", "register_model"
MLFLOW_RESTART_AFTER = 5.0  # seconds into the registration's first attempt
CHECKPOINT_WATCH = 600.0  # seconds the trainer's first attempt is watched for a checkpoint


@dataclass
class Faults:
    mlflow: object
    postgres: object
    rows: list[Row] = field(default_factory=list)
    trainer_lost_at: float = 0.0
    killed_after_epoch: int = 0
    mlflow_restart: threading.Thread | None = None

    def __call__(self, execution, node, task, attempt, seconds, cluster) -> None:
        if task == TRAINER and attempt == 0 and cluster is not None and not self.trainer_lost_at:
            self._lose_trainer_at_first_checkpoint(execution, node, cluster, seconds)
        restart = task == REGISTER and attempt == 0 and seconds >= MLFLOW_RESTART_AFTER
        if restart and self.mlflow_restart is None:
            self.mlflow_restart = threading.Thread(target=self.mlflow.restart, daemon=True)
            self.mlflow_restart.start()

    def _lose_trainer_at_first_checkpoint(self, execution, node, cluster, seconds) -> None:
        """Watch the node's checkpoint folder closely (epochs of a small run take well under a
        second) and lose the worker, then the head, as soon as a checkpoint is there."""
        checkpoints = (
            f"s3://{execution.store.bucket}/flyray-checkpoints/{PROJECT}/{DOMAIN}/"
            f"{execution.name}/{node}/"
        )
        began = time.monotonic()
        while time.monotonic() - began < CHECKPOINT_WATCH:
            epochs = re.findall(
                r"/epoch-(\d+)/state\.json$", "\n".join(execution.store.keys(checkpoints)), re.M
            )
            if epochs:
                self.killed_after_epoch = max(int(e) for e in epochs)
                cluster.kill_worker(0)
                time.sleep(0.5)
                cluster.head.send(signal.SIGKILL)
                self.trainer_lost_at = seconds + time.monotonic() - began
                return
            if not cluster.head.alive():
                return
            time.sleep(0.1)

    def trainer_outcome(self, execution) -> Row:
        """Where Flyte's next attempt of the trainer started (its TrainingReport)."""
        from flyteidl.core import literals_pb2
        from flytekit.core.context_manager import FlyteContextManager
        from flytekit.core.type_engine import TypeEngine
        from flytekit.models.literals import Literal

        from flyray.recsys.report import TrainingReport

        if not self.trainer_lost_at:
            return Row("fault: trainer pods lost", "SIGKILL", 0, "FAILED: no checkpoint was seen")
        [node] = [r.node.split()[0] for r in execution.rows if r.node.endswith(TRAINER)]
        attempts = execution.store.keys(f"{execution.meta}/{node}/data/")
        done = sorted(k for k in attempts if k.endswith("/outputs.pb"))
        if not done:
            return Row("fault: trainer pods lost", "SIGKILL", 0, "FAILED: no attempt finished")
        outputs = literals_pb2.LiteralMap.FromString(
            execution.store.get(f"s3://{execution.store.bucket}/{done[-1]}")
        )
        report = TypeEngine.to_python_value(
            FlyteContextManager.current_context(),
            Literal.from_flyte_idl(outputs.literals["report"]),
            TrainingReport,
        )
        attempt = done[-1].split("/")[-2]
        ok = attempt != "0" and 0 < report.resumed_from_epoch < report.epochs[-1]
        outcome = (
            f"killed after epoch {self.killed_after_epoch} was on S3; attempt {attempt} resumed "
            f"from epoch {report.resumed_from_epoch}, trained to epoch {report.epochs[-1]}"
        )
        return Row(
            f"fault: worker + head of {TRAINER} killed at {self.trainer_lost_at:.0f} s",
            "SIGKILL, next attempt re-submitted",
            0,
            outcome if ok else f"FAILED: {outcome}",
        )

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
