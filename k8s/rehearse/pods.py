"""What a pod is made of in the rehearsal: its environment (resolved from the rendered ConfigMaps
and Secrets as the kubelet resolves env and envFrom), its address (a loopback address in the
rehearsal's network namespace, named in its /etc/hosts as the cluster's DNS names it), and its
process (started in a session of its own, so that stopping it ends everything it started).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent
# What every container here gets from its image: this venv's tools first (the images install
# the same packages, images/__init__.py), then the system's.
IMAGE_PATH = f"{BIN}:/usr/local/bin:/usr/bin:/bin"
# Kubernetes quantities ("2", "500m", "8Gi", "1G"): the suffixes of resource.Quantity.
_UNITS = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


class RehearsalError(Exception):
    pass


def quantity(value: str | int | float) -> float:
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value).strip())
    if not match or match.group(2) not in _UNITS:
        raise RehearsalError(f"not a Kubernetes quantity: {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


class Objects:
    """The Kubernetes objects of the deployment, as rendered for `kubectl apply`."""

    def __init__(self, docs: list[dict]):
        self.docs = docs

    def add(self, docs: list[dict]) -> None:
        self.docs += docs

    def find(self, kind: str, namespace: str, name: str, optional: bool = False) -> dict | None:
        for doc in self.docs:
            meta = doc.get("metadata") or {}
            same_namespace = meta.get("namespace", namespace) == namespace
            if doc["kind"] == kind and meta.get("name") == name and same_namespace:
                return doc
        if optional:
            return None
        raise RehearsalError(f"{kind} {namespace}/{name} is not in the rendered manifests")

    def _data(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, str]:
        doc = self.find(kind, namespace, name, optional)
        if doc is None:
            return {}
        data = dict(doc.get("data") or {})
        if kind == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in data.items()}
            data.update(doc.get("stringData") or {})
        return {k: str(v) for k, v in data.items()}

    def secret(self, namespace: str, name: str) -> dict[str, str]:
        return self._data("Secret", namespace, name, optional=False)

    def env(self, container: dict, namespace: str) -> dict[str, str]:
        """A container's environment as the kubelet builds it: envFrom sources in order, then
        env (which wins), valueFrom resolved from the namespace's Secrets and ConfigMaps."""
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in source:
                    ref = source[key]
                    data = self._data(kind, namespace, ref["name"], ref.get("optional", False))
                    env.update({prefix + k: v for k, v in data.items()})
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
                continue
            source = item.get("valueFrom") or {}
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if key in source:
                    ref = source[key]
                    data = self._data(kind, namespace, ref["name"], ref.get("optional", False))
                    if ref["key"] not in data and not ref.get("optional"):
                        raise RehearsalError(
                            f"{kind} {namespace}/{ref['name']} has no key "
                            f"{ref['key']!r} ({item['name']})"
                        )
                    if ref["key"] in data:
                        env[item["name"]] = data[ref["key"]]
        return env


class Hosts:
    """The rehearsal's /etc/hosts: every Service (and every Ray head Service) gets a loopback
    address of its own and the names cluster DNS gives it. Written in place, so a bind mount of
    the file over /etc/hosts sees each new name."""

    def __init__(self, path: Path):
        self.path = path
        self.names: dict[str, str] = {}
        self._next = 0
        path.write_text("127.0.0.1 localhost\n::1 localhost\n")

    def address(self) -> str:
        self._next += 1
        return f"127.20.{self._next // 250}.{self._next % 250 + 1}"

    def service(self, name: str, namespace: str, address: str | None = None) -> str:
        """Names `name` of `namespace` as cluster DNS does (name, name.ns, name.ns.svc,
        name.ns.svc.cluster.local); the short name only resolves in the pod's own namespace on
        a cluster, and here for the platform namespace (flyray), whose pods use it."""
        address = address or self.address()
        fqdn = f"{name}.{namespace}.svc.cluster.local"
        names = [fqdn, f"{name}.{namespace}.svc", f"{name}.{namespace}"]
        if namespace == "flyray":
            names.append(name)
        with self.path.open("a") as fh:
            fh.write(f"{address} {' '.join(names)}\n")
        self.names[fqdn] = address
        return address


def enter_namespace(argv: list[str]) -> None:
    """Re-run this command in a new network and mount namespace (root, `unshare`), where only
    loopback exists and /etc/hosts is the rehearsal's own. Returns only inside it."""
    if inside_namespace():
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    reason = namespace_unavailable()
    if reason:
        raise RehearsalError(f"cannot rehearse: {reason}")
    env = {**os.environ, "FLYRAY_REHEARSAL_NAMESPACE": "1"}
    command = ["unshare", "--net", "--mount", "--", sys.executable, "-m", "k8s.rehearse", *argv]
    os.execvpe("unshare", command, env)


def inside_namespace() -> bool:
    return os.environ.get("FLYRAY_REHEARSAL_NAMESPACE") == "1"


def namespace_unavailable() -> str:
    """Why a network namespace cannot be made here ("" when it can)."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "`unshare` and `ip` (util-linux, iproute2) are needed"
    probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode:
        why = probe.stderr.strip() or f"exit {probe.returncode}"
        return f"no network namespace (unshare: {why}; it needs root)"
    return ""


def mount_hosts(path: Path) -> None:
    """Make `path` this namespace's /etc/hosts (the host's file is untouched)."""
    subprocess.run(["mount", "--bind", str(path), "/etc/hosts"], check=True)


def pod_paths(env: dict[str, str], home: Path) -> dict[str, str]:
    """A pod's environment with its /root emptyDir (HOME, where fast registration unpacks the
    code) as the pod's own folder here; /tmp is the host's."""
    return {k: str(home) + v[5:] if v == "/root" or v.startswith("/root/") else v
            for k, v in env.items()}  # fmt: skip


def declares_read_only_root(container: dict) -> bool:
    return bool((container.get("securityContext") or {}).get("readOnlyRootFilesystem"))


def read_only_root(argv: list[str]) -> list[str]:
    """`argv` as a container with `readOnlyRootFilesystem: true` runs: in a mount namespace of
    its own, / read-only (the image: the venv, the code, /etc, /root, /var), writable only
    under /tmp (every such flyray pod mounts an emptyDir there; the rehearsal keeps each pod's
    folders, its /root and volumes included, under /tmp too), /dev/shm and /proc. A write
    anywhere else fails as it would on the cluster."""
    script = 'mount --bind /tmp /tmp && mount -o remount,bind,ro / && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec", script,
            "sh", *argv]  # fmt: skip


def sessions() -> dict[int, list[int]]:
    """Processes by session, whatever their process group: Ray's workers take groups of their
    own, and what they start (Serve's HAProxy) outlived a signal to the pod's group. A zombie
    counts until it is reaped: its pid is still taken, and Postgres, restarted on the same data,
    refuses to start while the old postmaster's pid exists."""
    found: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):  # gone meanwhile
            session = int(stat.read_text().rsplit(")", 1)[1].split()[3])
            found.setdefault(session, []).append(int(stat.parent.name))
    return found


def session_pids(sid: int) -> list[int]:
    return sessions().get(sid, [])


STARTED: list[Process] = []  # every pod of this rehearsal, for `leftovers`


def leftovers(wait_s: float = 10) -> list[Process]:
    """The deleted pods that still have a process `wait_s` after (none, when deletion works as
    the kubelet's does: every process of the container ends)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = sessions()
        left = [p for p in STARTED if p.proc is not None and p.proc.poll() is not None
                and p.proc.pid in alive]  # fmt: skip
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


class Process:
    """One container's main process: its own session and log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        log: Path,
        user: str | None = None,
        read_only: bool = False,
    ):
        self.name, self.argv, self.env, self.cwd, self.log = name, argv, env, cwd, log
        self.user, self.read_only = user, read_only
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        self.cwd.mkdir(parents=True, exist_ok=True)
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        argv = [runuser, "-u", self.user, "--", *self.argv] if self.user else self.argv
        if self.read_only:
            argv = read_only_root(argv)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        STARTED.append(self)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        """Signal the whole session: a pod's processes go together."""
        if self.proc is not None:
            for pid in session_pids(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        stop_all([self], sig, timeout)

    def tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def stop_all(processes: list[Process], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Delete pods together, as Kubernetes does: `sig` to each, SIGKILL to whatever is left of
    any of them after `timeout` (the termination grace period)."""
    processes = [p for p in processes if p.proc is not None]
    for p in processes:
        p.send(sig)
    deadline, leaders = time.monotonic() + timeout, {p.proc.pid for p in processes}
    while time.monotonic() < deadline and not leaders.isdisjoint(sessions()):
        for p in processes:
            p.proc.poll()  # reap the leader
        time.sleep(0.2)
    for p in processes:
        p.send(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(timeout=10)


# How long a pod may take to become ready. A process that exits fails at once, so this bounds
# only a hang: a 2-core machine running the test suite beside the rehearsal took over 180 s to
# start MLflow.
READY_S = 600.0


def wait_for(
    what: str, ready: Callable[[], bool], timeout: float = READY_S, process: Process | None = None
):
    """Poll `ready` until it holds, as a readiness probe would; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RehearsalError(f"{what} exited ({process.proc.returncode}):\n{process.tail()}")
        try:
            if ready():
                return
        except Exception:  # not up yet: the probe's own errors are what "not ready" looks like
            pass
        time.sleep(0.5)
    tail = f":\n{process.tail()}" if process is not None else ""
    raise RehearsalError(f"{what} not ready after {timeout:.0f} s{tail}")


def http(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5,
) -> tuple[int, str]:
    """(status, body) of a request, error statuses included."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
