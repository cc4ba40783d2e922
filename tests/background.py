"""Long subprocess scenarios beside the rest of the suite.

Each job here is a whole program the suite would otherwise wait for, doing little on the CPU
for long stretches: the cluster rehearsal (`make rehearse`), the three node-loss scenarios
(tests/node_loss.py) and `make run` on a small demo. Jobs whose test is selected start when the
session's tests are collected (conftest), one after another, the longest first, while the other
tests run; each job's test, sorted last, collects its outcome with `result`. On the 2 cores
here the suite then takes about the longer of the two, not their sum (the e2e tier alone kept
the 2 cores 58% busy; with the rehearsal beside it, 95%). One job at a time, not more: with
the rehearsal and the scenarios side by side as well, a slow CI machine missed time limits that
no program there sets (Ray's 30 s for a node to register; MLflow took over 180 s to start).

What a job shares with the other tests is only the machine:
- the rehearsal has its own network and mount namespaces (addresses, ports, /etc/hosts), Ray
  temp dirs, buckets and Postgres;
- a node-loss scenario's Ray cluster lives under a RAY_TMPDIR of its own, so its address file
  (ray_current_cluster) is invisible to any other `ray.init()` on the host (`make run`'s local
  Ray, in the same lane, would attach to it);
- `make run` writes only under its job's folder.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Job:
    name: str
    script: str  # bash, run from the repository root; $JOB is the job's folder
    deadline_s: float  # from the job's start
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()  # variables (prefixes) of the session's left out


def _rehearsal() -> Job:
    bin_dir = Path(sys.executable).parent
    script = (
        f"{shlex.quote(str(bin_dir / 'pyflyte'))} --pkgs workflows package --fast --force "
        '--output "$JOB/flyray-flyte.tgz" > /dev/null && exec '
        f'{shlex.quote(sys.executable)} -m k8s.rehearse --archive "$JOB/flyray-flyte.tgz"'
    )
    return Job("rehearsal", script, 2700)  # alone: 616 s in CI


def _node_loss(scenario: str) -> Job:
    script = (
        f'RAY_TMPDIR="$JOB" exec {shlex.quote(sys.executable)} -m tests.node_loss {scenario} '
        '"$JOB/result.json"'
    )
    # Ray Train waits this long for the old worker count before going on with fewer (60 s by
    # default): the lost node never comes back here, so the wait is only time.
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "8"}
    return Job(f"node_loss {scenario}", script, 900, env)  # alone: 30-100 s


def _make_run() -> Job:
    """`make run`'s entry point on a small demo, as a user's shell runs it: its own data dir and
    temp dir, the embedded MLflow store, the default log levels."""
    script = f"exec {shlex.quote(sys.executable)} -m workflows.run_local --demo-events 30000"
    env = {"FLYRAY_DATA_DIR": "$JOB/data", "TMPDIR": "$JOB", "RAY_TMPDIR": "/tmp"}
    return Job("make run", script, 900, env, ("FLYRAY_LOG", "RAY_LOG", "MLFLOW_"))


JOBS = {  # the longest first: the suite's tail is then a short job
    job.name: job
    for job in [_rehearsal(), _make_run(), *map(_node_loss, ("funksvd", "xgboost", "torch"))]
}


@dataclass
class Outcome:
    code: int  # -1: interrupted at its deadline or by the end of the session
    stdout: str
    stderr: str
    folder: Path


@dataclass
class _Run:
    job: Job
    folder: Path
    done: threading.Event = field(default_factory=threading.Event)
    proc: subprocess.Popen | None = None
    began: float = 0.0
    outcome: Outcome | None = None


_RUNS: dict[str, _Run] = {}
_STOPPING = threading.Event()


def start(names: list[str]) -> None:
    """Start the named jobs (not yet started), one after another in a thread."""
    runs = []
    for name in sorted(set(names) - set(_RUNS), key=list(JOBS).index):
        _RUNS[name] = _Run(JOBS[name], Path(tempfile.mkdtemp(prefix="flyray-job-")))
        runs.append(_RUNS[name])
    threading.Thread(target=_one_by_one, args=(runs,), daemon=True).start()


def _one_by_one(runs: list[_Run]) -> None:
    for run in runs:
        try:
            if _STOPPING.is_set():
                run.outcome = Outcome(-1, "", "not started: the session ended", run.folder)
            else:
                _execute(run)
        except Exception as exc:  # the test names it; the next job runs
            run.outcome = Outcome(-1, "", f"could not run: {exc!r}", run.folder)
        finally:
            run.done.set()


def _execute(run: _Run) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(run.job.unset)}
    env.update({k: v.replace("$JOB", str(run.folder)) for k, v in run.job.env.items()})
    env["JOB"] = str(run.folder)
    with open(run.folder / "stdout", "w") as out, open(run.folder / "stderr", "w") as err:
        run.began = time.monotonic()
        run.proc = subprocess.Popen(
            ["bash", "-c", run.job.script], cwd=REPO, env=env, stdout=out, stderr=err,
            start_new_session=True,
        )  # fmt: skip
    try:
        code = run.proc.wait(timeout=run.job.deadline_s)
    except subprocess.TimeoutExpired:
        code = -1
    stop_group(run.proc, signal.SIGINT)  # at its deadline; and whatever it left running
    out, err = ((run.folder / name).read_text() for name in ("stdout", "stderr"))
    run.outcome = Outcome(code, out, err, run.folder)


def result(name: str) -> Outcome:
    """The job's outcome once it ends; starts it when no hook did (a test run alone)."""
    start([name])
    run = _RUNS[name]
    run.done.wait()
    assert run.outcome is not None
    return run.outcome


def stop() -> None:
    """Start nothing more; interrupt the jobs still running (SIGINT: the rehearsal's own
    cleanup stops its platform; SIGKILL after 60 s), then remove their folders."""
    _STOPPING.set()
    for run in _RUNS.values():
        while not run.done.wait(timeout=0.5):
            if run.proc is not None:
                stop_group(run.proc, signal.SIGINT)
        shutil.rmtree(run.folder, ignore_errors=True)
    _RUNS.clear()
    _STOPPING.clear()


def stop_group(proc: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 60) -> None:
    """Stop `proc`, started in a session of its own, and its process group: `first` to all of
    them, SIGKILL to whatever is left after `grace` seconds or once the leader is gone (a
    loaded machine took over 20 s to let `mlflow server` go)."""
    with contextlib.suppress(ProcessLookupError):  # all gone already
        os.killpg(proc.pid, first)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()  # the leader itself, were it in no group of its own (a no-op once reaped)
    proc.wait()
