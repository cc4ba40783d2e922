"""The console: quiet by default, everything in a log file.

A user sees one line as each task starts and ends, progress bars for long loops (on a terminal),
the warnings that matter (rejects, a refused promotion, a fallback) and the summary.
`FLYRAY_LOG_LEVEL` picks what else reaches the console: WARNING (default) shows flyray's warnings,
INFO adds flyray's own progress lines (epochs, blocks), DEBUG brings back every library's chatter
(Ray's logs, its workers' output, Ray Data's progress bars, MLflow's messages). The full log
(INFO and up from every library, flyray at DEBUG) always goes to a file: `FLYRAY_LOG_FILE`, or
`<FLYRAY_DATA_DIR, default .data>/logs/flyray-<time>-<pid>.log`; `log_path()` names it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

LEVEL_VARIABLE = "FLYRAY_LOG_LEVEL"
FILE_VARIABLE = "FLYRAY_LOG_FILE"
_TASKS = logging.getLogger("flyray.tasks")
# Libraries that install their own console handlers: routed through ours instead.
_LIBRARIES = ("ray", "mlflow", "py.warnings", "numba", "tensorflow", "absl", "h5py")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def level() -> int:
    """The console level chosen by FLYRAY_LOG_LEVEL (a level name; WARNING when unset)."""
    name = os.environ.get(LEVEL_VARIABLE, "WARNING").upper()
    value = logging.getLevelName(name)
    if not isinstance(value, int):
        raise ValueError(f"{LEVEL_VARIABLE}={name!r}: expected DEBUG, INFO, WARNING or ERROR")
    return value


def verbose() -> bool:
    return level() <= logging.DEBUG


def quiet_libraries() -> None:
    """Turn off what libraries print by themselves, unless the user asked for it (DEBUG).
    Ray reads these when it is imported or started, so this runs before the first `import ray`
    (tasks/__init__.py, bench/__init__.py); a variable the user set is left as it is."""
    if verbose():
        return
    defaults = {
        # Ray workers' stdout and stderr (Ray Train's per-report lines) stay in Ray's session logs.
        "RAY_LOG_TO_DRIVER": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        # Tune's new output engine prints its configuration box even at verbose=0.
        "RAY_AIR_NEW_OUTPUT": "0",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TRANSFORMERS_VERBOSITY": "error",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


class _Console(logging.Handler):
    """Writes through tqdm so that log lines and progress bars do not overwrite each other;
    in quiet mode only task lines, flyray's records at the chosen level, and other libraries'
    errors pass."""

    def __init__(self, threshold: int):
        super().__init__(logging.DEBUG)
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == _TASKS.name or self.threshold <= logging.DEBUG:
            return True
        if record.name == "flyray" or record.name.startswith("flyray."):
            return record.levelno >= self.threshold
        return record.levelno >= logging.ERROR

    def format(self, record: logging.LogRecord) -> str:
        if self.threshold <= logging.DEBUG:
            return logging.Formatter(_FORMAT).format(record)
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info and record.levelno >= logging.ERROR and self.threshold <= logging.INFO:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        return text

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the task down
            self.handleError(record)


def _default_path() -> Path:
    from flyray.registry import data_dir

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return data_dir() / "logs" / f"flyray-{stamp}-{os.getpid()}.log"


_path: Path | None = None
_task = ""


def configure() -> Path:
    """Route every logger to the console filter and the log file; idempotent per process.
    Ray, Ray Data and MLflow attach their own console handlers when imported, so they are
    imported first and then sent through ours."""
    global _path
    if _path is not None:
        return _path
    quiet_libraries()
    import mlflow.utils.logging_utils
    import ray
    import ray.data  # noqa: F401  (configures the 'ray.data' logger on import)

    threshold = level()
    _path = Path(os.environ.get(FILE_VARIABLE) or _default_path())
    _path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(_path)
    to_file.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(to_file)
    root.addHandler(_Console(threshold))
    logging.getLogger("flyray").setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    for name in list(logging.Logger.manager.loggerDict):
        if name.split(".")[0] in _LIBRARIES:
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
            logger.setLevel(logging.NOTSET)
    if threshold > logging.DEBUG:
        # MLflow prints some events straight to stderr ("Successfully registered model ..."):
        # flyray's registry logs its own decision instead.
        mlflow.utils.logging_utils.disable_logging()
    if ray.is_initialized():
        log_ray_location()
    return _path


def current_task() -> str:
    """The task whose lines `task_lines` is printing (its decks are marked with it)."""
    return _task


def log_path() -> Path | None:
    """The log file of this process, once `configure` ran."""
    return _path


def log_ray_location() -> None:
    """Ray's workers log into the session folder, not to this console: say where it is."""
    import ray

    node = ray._private.worker._global_node  # the only handle on the session folder
    if node is not None:
        logging.getLogger("flyray").info("Ray logs: %s/logs", node.get_session_dir_path())


def progress(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """A progress bar on a terminal (none when output goes to a file or pipe, unless DEBUG):
    tqdm, so the loop costs nothing when hidden."""
    kwargs.setdefault("disable", None if not verbose() else False)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def task_lines(name: str) -> Iterator[None]:
    """One line as a task starts and one as it ends, with its duration; a failure names the
    error and the log file."""
    global _task
    configure()
    _task = name
    _TASKS.info("%s ...", name)
    began = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        seconds = time.perf_counter() - began
        _TASKS.error("%s failed after %.1f s: %s (log: %s)", name, seconds, exc, _path)
        raise
    _TASKS.info("%s done in %.1f s", name, time.perf_counter() - began)
