"""What every Ray Train run of flyray shares: where its checkpoints go, how many failures it
survives, and how many workers it asks for (elastic after a lost node)."""

from __future__ import annotations

import tempfile

from flyray import storage


def worker_count(n_workers: int, min_workers: int) -> int | tuple[int, int]:
    """ScalingConfig.num_workers: elastic `(min_workers, n_workers)` when 1 <= min_workers <
    n_workers (after a lost node the group restarts with what the cluster can place instead of
    waiting for a replacement), else a fixed `n_workers`."""
    return (min_workers, n_workers) if 0 < min_workers < n_workers else n_workers


def run_config(
    name: str | None, storage_uri: str, max_failures: int, keep: int | None = 2, **extra
):
    """(RunConfig, storage URI): checkpoints under `storage_uri` (local or s3://; "" = a new
    temporary directory), the newest `keep` kept (None: all), restarts from the latest one after
    up to `max_failures` failures. A run started again with the same storage URI and `name`
    resumes from its checkpoints; `name=None` makes every run a fresh one. `extra` goes to
    RunConfig as is."""
    import ray.train

    uri = storage_uri or tempfile.mkdtemp(prefix=f"{name or 'ray-train'}-")
    fs, path = storage.filesystem(uri)
    return ray.train.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
        **extra,
    ), uri
