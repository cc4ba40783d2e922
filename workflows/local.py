"""Where a local run (`make run`, backfill, reproduce) keeps its outputs and its task cache.

flytekit writes a local run's outputs to a fresh temporary folder but keeps its task cache in
~/.flyte/local-cache for good: once the folder is gone (a reboot, a tmp cleaner, another test's
tmp_path) a cache hit hands the next task paths that no longer exist, and the run fails
converting its inputs (flyteorg/flyte#6393, unfixed in flytekit 1.16). Here both live under
`<FLYRAY_DATA_DIR>/flyte`, so an entry and the files it names stay, and go, together; the run's
model files and recommendations outlive /tmp as well. Each run's scratch (decks, working files)
gets a folder of its own under `<FLYRAY_DATA_DIR>/tmp`, as `make run` always had.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flytekit import FlyteContextManager
from flytekit.core import local_cache
from flytekit.core.data_persistence import FileAccessProvider

from flyray.registry import data_dir


@contextmanager
def local_run() -> Iterator[Path]:
    """Runs what the block executes with its raw outputs and task cache under the data dir."""
    root = data_dir() / "flyte"
    scratch = data_dir() / "tmp"  # where `make ui` looks for a run's decks (flyray/ui.py)
    scratch.mkdir(parents=True, exist_ok=True)
    ctx = FlyteContextManager.current_context()
    access = FileAccessProvider(
        local_sandbox_dir=os.path.join(tempfile.mkdtemp(prefix="flyte-", dir=scratch), "sandbox"),
        raw_output_prefix=str(root / "raw"),
        data_config=ctx.file_access.data_config,
    )
    params = ctx.user_space_params.builder()
    params.raw_output_prefix = access.raw_output_prefix
    state = ctx.execution_state.with_params(user_space_params=params.build())
    before = local_cache.CACHE_LOCATION
    local_cache.CACHE_LOCATION = str(root / "cache")
    local_cache.LocalTaskCache._initialized = False  # opens the cache at its new place
    try:
        with FlyteContextManager.with_context(
            ctx.with_file_access(access).with_execution_state(state)
        ):
            yield root
    finally:
        local_cache.CACHE_LOCATION = before
        local_cache.LocalTaskCache._initialized = False
