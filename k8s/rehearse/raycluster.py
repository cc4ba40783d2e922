"""A Ray cluster made of a RayJob's (or RayService's) cluster spec, pod by pod, as KubeRay makes
it: every head and worker replica is a separate `ray start --block` process with its pod's
environment (env and envFrom resolved), its container's CPU, GPU and memory limits as Ray
resources and its group's rayStartParams; workers join through the head's Service name once its
GCS takes connections (KubeRay's wait-gcs-ready init container). A job
is submitted through the Ray Jobs API of the head's dashboard, as KubeRay's submitter does
(`ray job submit --address http://<head-svc>:8265 --submission-id <rayjob>`).

Where one machine differs from pods, said once:
- MEMORY_SCALE: every pod's memory limit (Ray's `--memory`, and the object store, 30% of it as
  KubeRay's default) is multiplied by it, so that three 8 GiB pods fit a 24 GiB machine. CPUs and
  GPUs are Ray's logical scheduling resources and stay as declared, so that placement (how many
  workers fit a pod) is the cluster's; the machine's cores are time-shared.
- 0.0.0.0 in a pod binds the pod's address: here it is replaced by the pod's own loopback
  address, so that several clusters' dashboards can listen at once.
- Ports a pod has to itself (the dashboard agent's, metrics) are chosen free per pod.
- Each pod's folder stands in for its filesystem: its Ray temp dir, its /root (the fast
  registration's --dest-dir, where the driver runs).
`authOptions` token mode is applied as KubeRay applies it: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN
(the named Secret's auth_token) in every Ray container; the rehearsal's own calls to the
dashboard carry the token as the operator's do.
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import threading
import time
from pathlib import Path

from k8s.rehearse.pods import (
    IMAGE_PATH,
    READY_S,
    Hosts,
    Objects,
    Process,
    declares_read_only_root,
    http,
    pod_paths,
    quantity,
    stop_all,
    wait_for,
)

GCS_PORT = 6379  # the head Service's gcs-server port, KubeRay's default
MEMORY_SCALE = 0.25
OBJECT_STORE_SHARE = 0.3  # of a pod's memory, Ray's and KubeRay's default
# rayStartParams that `ray start` takes as bare flags ("true": the flag, "false": left out).
_FLAGS = {"disable-usage-stats", "block", "no-monitor", "head"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_POD_IDS = itertools.count()  # Ray's temp dirs are short: its socket paths have 107 bytes
_DELETING: list[threading.Thread] = []  # clusters whose pods are still terminating


def _listening(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((address, port)) == 0


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def ray_resources(container: dict) -> list[str]:
    """`ray start` resource flags from a container's limits (requests where no limit)."""
    resources = container.get("resources") or {}
    limits = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
    flags = []
    if "cpu" in limits:
        flags.append(f"--num-cpus={int(quantity(limits['cpu']))}")
    if "nvidia.com/gpu" in limits:
        flags.append(f"--num-gpus={int(quantity(limits['nvidia.com/gpu']))}")
    if "memory" in limits:
        memory = int(quantity(limits["memory"]) * MEMORY_SCALE)
        flags += [f"--memory={memory}", f"--object-store-memory={int(memory * OBJECT_STORE_SHARE)}"]
    return flags


def start_params(params: dict, address: str) -> list[str]:
    flags = []
    for key, value in params.items():
        value = str(value)
        if key in _FLAGS:
            flags += [f"--{key}"] if value.lower() == "true" else []
        else:
            flags.append(f"--{key}={address if value == '0.0.0.0' else value}")
    return flags


class RayCluster:
    """One Ray cluster of `spec` (a rayClusterSpec), called `name` in `namespace`."""

    def __init__(
        self,
        name: str,
        namespace: str,
        spec: dict,
        objects: Objects,
        hosts: Hosts,
        root: Path,
        temp_root: Path,
        extra_env: dict[str, str] | None = None,
    ):
        """`root`: the pods' folders; `temp_root`: a short path for Ray's temp dirs."""
        self.name, self.namespace, self.spec, self.temp_root = name, namespace, spec, temp_root
        self.objects, self.hosts, self.root = objects, hosts, root
        self.extra_env = dict(extra_env or {})
        self.headers: dict[str, str] = {}
        auth = spec.get("authOptions") or {}
        if auth.get("mode") == "token":
            token = objects.secret(namespace, auth["secretName"])["auth_token"]
            self.extra_env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
            self.headers = {"authorization": f"Bearer {token}"}
        self.head_service = f"{name}-head-svc.{namespace}.svc.cluster.local"
        self.head: Process | None = None
        self.workers: list[Process] = []
        self.dashboard = f"http://{self.head_service}:8265"

    def _pod(self, role: str, template: dict, params: dict, address: str, head: bool) -> Process:
        [container] = template["spec"]["containers"]
        folder = self.root / role
        env = {
            "PATH": IMAGE_PATH,
            "HOME": str(folder / "root"),
            **self.objects.env(container, self.namespace),
            **self.extra_env,
        }
        env = pod_paths(env, folder / "root")
        argv = [
            str(Path(IMAGE_PATH.split(":")[0]) / "ray"),
            "start",
            "--block",
            f"--node-ip-address={address}",
            f"--temp-dir={self.temp_root / str(next(_POD_IDS))}",
            f"--dashboard-agent-listen-port={_free_port(address)}",
            f"--metrics-export-port={_free_port(address)}",
            *ray_resources(container),
        ]
        if head:
            argv += [
                "--head",
                f"--port={GCS_PORT}",
                "--dashboard-port=8265",
                "--ray-client-server-port=10001",
            ]
        else:
            argv.append(f"--address={self.head_service}:{GCS_PORT}")
        argv += start_params(params, address)
        read_only = declares_read_only_root(container)
        return Process(
            f"{self.name}/{role}", argv, env, folder / "root", folder / "ray.log",
            read_only=read_only,
        ).start()  # fmt: skip

    def start(self, timeout: float = READY_S) -> None:
        head = self.spec["headGroupSpec"]
        address = self.hosts.service(f"{self.name}-head-svc", self.namespace)
        self.head = self._pod(
            "head", head["template"], head.get("rayStartParams") or {}, address, head=True
        )
        # KubeRay's workers wait in an init container until the head's GCS answers, not for
        # the dashboard: they start here once its port takes connections.
        wait_for(f"{self.name} GCS", lambda: _listening(address, GCS_PORT), timeout, self.head)
        for group in self.spec.get("workerGroupSpecs") or []:
            for i in range(int(group.get("replicas", group.get("minReplicas", 0)))):
                self.workers.append(
                    self._pod(
                        f"{group['groupName']}-{i}",
                        group["template"],
                        group.get("rayStartParams") or {},
                        self.hosts.address(),
                        head=False,
                    )
                )
        wait_for(f"{self.name} head", self._dashboard_up, timeout, self.head)
        wait_for(
            f"{self.name}: {self.nodes_expected} Ray nodes",
            lambda: self.alive_nodes() >= self.nodes_expected,
            timeout,
            self.head,
        )

    @property
    def pods_in_spec(self) -> int:
        groups = self.spec.get("workerGroupSpecs") or []
        return 1 + sum(int(g.get("replicas", g.get("minReplicas", 0))) for g in groups)

    @property
    def nodes_expected(self) -> int:
        return 1 + len(self.workers)

    def _dashboard_up(self) -> bool:
        return http(f"{self.dashboard}/api/version", headers=self.headers)[0] == 200

    def alive_nodes(self) -> int:
        status, body = http(f"{self.dashboard}/nodes?view=summary", headers=self.headers)
        if status != 200:
            return 0
        summary = json.loads(body)["data"]["summary"]
        return sum(1 for n in summary if n["raylet"]["state"] == "ALIVE")

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers=self.headers or None)

    def submit(self, submission_id: str, entrypoint: str, runtime_env: dict | None = None) -> str:
        return self.client().submit_job(
            entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env
        )

    def wait(self, submission_id: str, timeout: float, while_running=None) -> str:
        """The job's terminal status (STOPPED after `timeout`, as activeDeadlineSeconds stops
        it; LOST when the head pod is gone, or has not answered for a minute: a loaded machine
        makes the dashboard slow, not the job lost); `while_running(cluster)` is called every
        poll (the fault rehearsals use it)."""
        client = self.client()
        deadline = time.monotonic() + timeout
        unreachable = 0
        while True:
            try:
                status = str(client.get_job_status(submission_id).value)
                unreachable = 0
            except Exception:  # a busy dashboard, or the head is gone and the job with it
                unreachable += 1
                if not self.head.alive() or unreachable >= 60:
                    return "LOST"
                time.sleep(1)
                continue
            if status in TERMINAL:
                return status
            if time.monotonic() > deadline:
                client.stop_job(submission_id)
                return "STOPPED"
            if while_running is not None:
                while_running(self)
            time.sleep(1)

    def logs(self, submission_id: str) -> str:
        try:
            return self.client().get_job_logs(submission_id)
        except Exception as err:  # the head may be gone (a fault rehearsal)
            return f"(no logs: {err})"

    def kill_worker(self, index: int = 0) -> None:
        """A lost worker pod: SIGKILL its every process, nothing drains."""
        self.workers[index].send(signal.SIGKILL)

    def stop(self) -> None:
        """shutdownAfterJobFinishes: the pods are deleted together (SIGTERM, then SIGKILL after
        the grace period) while the workflow goes on: propeller does not wait for deletions."""
        pods = [p for p in [self.head, *self.workers] if p is not None]
        deleting = threading.Thread(target=stop_all, args=(pods,), kwargs={"timeout": 15})
        deleting.start()
        _DELETING.append(deleting)


def wait_deleted() -> None:
    """Every cluster's pods gone (before the platform they talk to stops)."""
    while _DELETING:
        _DELETING.pop().join()
