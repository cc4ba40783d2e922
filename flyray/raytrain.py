"""What every distributed training run of flyray shares: how wide it is, where its checkpoints
go, how many failures it survives (one `DistributedConfig` for FunkSVD, XGBoost, the CNN and the
CLIP classifier), and the Ray Train run configuration built from it."""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass

from flyray import console, storage


def require_ray() -> None:
    """Library code starts nothing: the task, CLI, bench or test that calls it starts Ray (and
    says where), so a library function never starts a second, differently configured one."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not started: call ray.init() first (flyray's tasks, CLIs "
                           "and benchmarks do)")  # fmt: skip


@dataclass
class DistributedConfig:
    """How a training run spreads over Ray and survives failures: one knob per concept.

    `workers` is also what the task's Ray cluster is sized by (the tasks layer asks for enough
    worker pods to place `workers x cpus_per_worker` CPUs), so a run changes one number.
    """

    workers: int = 2  # training workers (Ray Train workers, FunkSVD actors)
    # 1 <= min_workers < workers: elastic; after a lost node training resumes from the last
    # checkpoint on the workers the cluster can still place instead of waiting for a
    # replacement (and the task's Ray cluster autoscales between the two). 0: always `workers`.
    min_workers: int = 1
    cpus_per_worker: int = 1  # Ray CPUs each worker reserves (its thread count)
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    checkpoint_every: int = 1  # rounds or epochs between checkpoints
    # Checkpoints (local or s3://). "" inside a Flyte task: the task's checkpoint folder, stable
    # across Flyte retries of the same node (tasks/outputs.py); elsewhere a temporary folder.
    checkpoint_uri: str = ""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.min_workers < 0 or self.cpus_per_worker < 1:
            raise ValueError(
                f"DistributedConfig: workers ({self.workers}) and cpus_per_worker "
                f"({self.cpus_per_worker}) must be >= 1, min_workers ({self.min_workers}) >= 0"
            )
        if self.checkpoint_every < 1 or self.max_failures < 0:
            raise ValueError("DistributedConfig: checkpoint_every >= 1 and max_failures >= 0")

    def worker_count(self) -> int | tuple[int, int]:
        """ScalingConfig.num_workers: elastic `(min_workers, workers)` when 1 <= min_workers <
        workers (after a lost node the group restarts with what the cluster can place instead
        of waiting for a replacement), else a fixed `workers`."""
        w, lo = self.workers, self.min_workers
        return (lo, w) if 0 < lo < w else w


def run_config(name: str | None, config: DistributedConfig, keep: int | None = 2, **extra):
    """(RunConfig, storage URI): checkpoints under `config.checkpoint_uri` (local or s3://;
    "" = a new temporary directory), the newest `keep` kept (None: all), restarts from the
    latest one after up to `max_failures` failures. A run started again with the same storage
    URI and `name` resumes from its checkpoints (this is how a Flyte retry resumes); `name=None`
    makes every run a fresh one. `extra` goes to RunConfig as is."""
    import ray.train

    uri = config.checkpoint_uri or tempfile.mkdtemp(prefix=f"{name or 'ray-train'}-")
    fs, path = storage.filesystem(uri)
    return ray.train.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
        **extra,
    ), uri


class TrainingProgress:
    """A console progress bar for a Ray Train run, one step per `ray.train.report` round.
    Ray Train calls user callbacks in its controller actor, not in the driver, so each report
    travels back through a Ray queue; a hidden bar (no terminal) sets up nothing.

    progress = TrainingProgress(epochs, "CNN", "epoch", config.checkpoint_every)
    run_config(name, config, callbacks=progress.callbacks); with progress: trainer.fit()
    """

    def __init__(self, total: int, desc: str, unit: str, every: int = 1):
        self.bar = console.progress(total=total, desc=desc, unit=unit)
        self.every = every  # rounds or epochs per report (DistributedConfig.checkpoint_every)
        self.callbacks: list = []
        self._queue = None
        self._stop = threading.Event()
        if not self.bar.disable:
            from ray.train import UserCallback
            from ray.util.queue import Queue

            class Reported(UserCallback):
                def __init__(self, queue):
                    self.queue = queue

                def after_report(self, run_context, metrics, checkpoint):
                    self.queue.put_nowait(1)

            self._queue = Queue()
            self.callbacks = [Reported(self._queue)]

    def _step(self) -> None:
        self.bar.update(min(self.every, self.bar.total - self.bar.n))

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self._queue.get(timeout=0.5)
                self._step()
            except Empty:
                continue

    def __enter__(self) -> TrainingProgress:
        if self._queue is not None:
            self._thread = threading.Thread(target=self._pump, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._queue is not None:
            self._stop.set()
            self._thread.join()
            for _ in range(self._queue.size()):  # reports that came after the last poll
                self._step()
            self._queue.shutdown()
        self.bar.close()
