"""The cluster rehearsal beside the rest of the suite.

`make rehearse` shares nothing with the other tests but the machine: its own network and mount
namespaces (addresses, ports, /etc/hosts), its own Ray temp dirs, buckets and Postgres. Started
when the session's tests are collected (conftest), it runs while they do, and `test_rehearsal`,
sorted last, collects its outcome: the suite takes about the longer of the two, not their sum
(the e2e tier alone kept the 2 cores 58% busy; together they are 95% busy).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 2700  # from its start: the rehearsal alone took 10 minutes in CI (616 s)


@dataclass
class Run:
    proc: subprocess.Popen
    folder: Path
    began: float


_RUN: list[Run] = []


def start() -> None:
    """Package the workflows (`make package`), then rehearse the archive, in the background."""
    if _RUN:
        return
    folder = Path(tempfile.mkdtemp(prefix="flyray-rehearsal-"))
    archive = folder / "flyray-flyte.tgz"
    bin_dir = Path(sys.executable).parent
    script = (
        f"{shlex.quote(str(bin_dir / 'pyflyte'))} --pkgs workflows package --fast --force "
        f"--output {shlex.quote(str(archive))} > /dev/null && exec "
        f"{shlex.quote(sys.executable)} -m k8s.rehearse --archive {shlex.quote(str(archive))}"
    )
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        proc = subprocess.Popen(
            ["bash", "-c", script], cwd=REPO, stdout=out, stderr=err, start_new_session=True
        )
    _RUN.append(Run(proc, folder, time.monotonic()))


def result() -> tuple[int, str, str]:
    """(exit status, stdout, stderr) once it ends; starts it when no hook did."""
    start()
    [run] = _RUN
    left = max(1.0, DEADLINE_S - (time.monotonic() - run.began))
    try:
        code = run.proc.wait(timeout=left)
    except subprocess.TimeoutExpired:
        _interrupt(run.proc)
        code = -1
    out, err = ((run.folder / name).read_text() for name in ("stdout", "stderr"))
    return code, out, err


def stop() -> None:
    """Interrupt a rehearsal still running (its own cleanup stops the platform), then remove
    its folder."""
    while _RUN:
        run = _RUN.pop()
        _interrupt(run.proc)
        shutil.rmtree(run.folder, ignore_errors=True)


def _interrupt(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
