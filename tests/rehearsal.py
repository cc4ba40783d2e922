"""The cluster rehearsal (`make rehearse`, ~23 min alone here) as the suite runs it: beside the
other tests, not after them. It lives in a network namespace of its own, so nothing it starts
(Postgres, MinIO, MLflow, a dozen Ray clusters) meets a port or a Ray that another test starts;
on 2 cores the two streams share the CPU, but each leaves the other's idle time to use.
conftest.py starts it as soon as test_rehearsal is selected; the test waits for it and checks
its table. An aborted session stops it as Ctrl-C would (its clean-up runs)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from k8s.rehearse.pods import namespace_unavailable

REPO = Path(__file__).resolve().parents[1]
NODE_ID = "tests/test_rehearse.py::test_rehearsal"


class Background:
    """`pyflyte package` (what `make rehearse` packages), then `python -m k8s.rehearse`."""

    def __init__(self) -> None:
        self.skipped = namespace_unavailable()
        self.folder = Path(tempfile.mkdtemp(prefix="flyray-rehearsal-"))
        self.log = self.folder / "rehearsal.log"
        self.began = time.monotonic()
        self.proc: subprocess.Popen | None = None
        if self.skipped:
            return
        archive = self.folder / "flyray-flyte.tgz"
        pyflyte = Path(sys.executable).parent / "pyflyte"
        package = [str(pyflyte), "--pkgs", "workflows", "package", "--fast", "--force",
                   "--output", str(archive)]  # fmt: skip
        rehearse = [sys.executable, "-m", "k8s.rehearse", "--archive", str(archive)]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", f"{_quote(package)} > /dev/null && exec {_quote(rehearse)}"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait(self, timeout: float) -> tuple[int, str, float]:
        """Exit status, output and seconds since it started."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.began)))
        except subprocess.TimeoutExpired:
            self.stop()
            code = -1
        return code, self.log.read_text(), time.monotonic() - self.began

    def stop(self) -> None:
        """SIGINT first: the rehearsal stops its clusters and platform in its `finally`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGINT, 120), (signal.SIGKILL, 10)):
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout=grace)
                return
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue


def _quote(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)
