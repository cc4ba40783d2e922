"""The RayService of k8s/ray/rayservice.yaml, as KubeRay runs it: a Ray cluster of its
rayClusterConfig (k8s.rehearse.raycluster: head and worker pods, token authentication), its
serveConfigV2 PUT to the head's dashboard (`/api/serve/applications/`, what the operator sends),
the applications polled until RUNNING, and the `<name>-serve-svc` Service named in /etc/hosts.
Requests then go through that Service name, as a client in the cluster sends them.

One difference, said once: the config's `proxy_location: EveryNode` puts a proxy on every pod,
each binding its own pod's port 8000; pods on one machine share one network, so here the proxy
runs on the head only (HeadOnly) and the Service points at the head.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import yaml

from k8s.rehearse.flyte import Row
from k8s.rehearse.pods import Hosts, Objects, RehearsalError, http
from k8s.rehearse.raycluster import RayCluster

NAMESPACE = "flyray"
SERVE_PORT = 8000


class RayService:
    def __init__(self, objects: Objects, hosts: Hosts, root: Path, name: str = "flyray-serve"):
        self.doc = objects.find("RayService", NAMESPACE, name)
        self.name, self.hosts = name, hosts
        self.config = yaml.safe_load(self.doc["spec"]["serveConfigV2"])
        self.config["proxy_location"] = "HeadOnly"  # one machine, one port 8000: see above
        cluster = f"{name}-{random.getrandbits(20):05x}"  # KubeRay's RayCluster of the service
        self.cluster = RayCluster(
            cluster, NAMESPACE, self.doc["spec"]["rayClusterConfig"], objects, hosts,
            root / "pods" / cluster, root / "r",
        )  # fmt: skip
        self.url = f"http://{name}-serve-svc.{NAMESPACE}.svc.cluster.local:{SERVE_PORT}"

    @property
    def applications(self) -> list[str]:
        return [a["name"] for a in self.config["applications"]]

    def start(self, timeout: float = 600) -> dict[str, str]:
        """The cluster up, the config deployed, every application RUNNING (or failed: then the
        rehearsal fails naming it); returns each application's status."""
        self.cluster.start()
        head = self.hosts.names[self.cluster.head_service]
        self.hosts.service(f"{self.name}-head-svc", NAMESPACE, head)
        self.hosts.service(f"{self.name}-serve-svc", NAMESPACE, head)
        body = json.dumps(self.config).encode()
        headers = {**self.cluster.headers, "content-type": "application/json"}
        status, text = http(
            f"{self.cluster.dashboard}/api/serve/applications/", "PUT", body, headers, 60
        )
        if status != 200:
            raise RehearsalError(f"serve config refused by the dashboard: {status} {text[:300]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.statuses()
            failed = {a: s for a, s in found.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
            if failed:
                raise RehearsalError(f"{self.name}: applications failed: {failed}")
            if found and all(found.get(a) == "RUNNING" for a in self.applications):
                return found
            time.sleep(2)
        raise RehearsalError(f"{self.name}: applications not RUNNING after {timeout:.0f} s")

    def statuses(self) -> dict[str, str]:
        status, text = http(
            f"{self.cluster.dashboard}/api/serve/applications/", headers=self.cluster.headers
        )
        if status != 200:
            return {}
        apps = json.loads(text).get("applications") or {}
        return {name: app.get("status", "") for name, app in apps.items()}

    def request(self, path: str, payload: dict | None = None) -> tuple[int, dict]:
        """A request through the Service name, as a client in the cluster sends it."""
        body = None if payload is None else json.dumps(payload).encode()
        status, text = http(
            f"{self.url}{path}", "POST" if body else "GET", body,
            {"content-type": "application/json"}, timeout=60,
        )  # fmt: skip
        try:
            return status, json.loads(text)
        except ValueError:
            return status, {"body": text[:200]}

    def stop(self) -> None:
        self.cluster.stop()


def rehearse(objects: Objects, hosts: Hosts, root: Path, model: str) -> list[Row]:
    """The RayService up, then: `model`'s champion recommends through the Service name, a name
    without a champion answers 503, and the dashboard refuses a caller without the token."""
    service = RayService(objects, hosts, root)
    rows: list[Row] = []
    began = time.monotonic()
    how = f"RayService on {service.cluster.pods_in_spec} raylets"
    try:
        found = service.start()
        rows.append(Row(f"rayservice {service.name}", how, time.monotonic() - began,
                        f"{len(found)} applications RUNNING"))  # fmt: skip
        began = time.monotonic()
        status, info = service.request(f"/{model}/")
        status_r, answer = service.request(f"/{model}/recommend", {"user_ids": [1, 2], "n": 5})
        items = [len(r["items"]) for r in answer.get("recommendations", [])]
        rows.append(Row(
            f"recommend via {service.name}-serve-svc", "HTTP", time.monotonic() - began,
            f"{status_r}: {items} items for 2 users from version {answer.get('model_version')}"
            f" (GET /{model}/: {status}, version {info.get('model_version')})",
        ))  # fmt: skip
        if status_r != 200 or items != [5, 5]:
            rows[-1].outcome = f"FAILED; {rows[-1].outcome}: {answer}"
        others = [a for a in service.applications if a != model]
        if others:
            status_o, body = service.request(f"/{others[0]}/")
            rows.append(Row(
                f"{others[0]} via {service.name}-serve-svc", "HTTP", 0.0,
                f"{status_o} ({body.get('error', body)})" if status_o == 503
                else f"FAILED; {status_o}, expected 503 without a champion: {body}",
            ))  # fmt: skip
        status_d, _ = http(f"{service.cluster.dashboard}/api/serve/applications/")
        rows.append(Row(
            "Ray dashboard without the token", "HTTP", 0.0,
            f"{status_d} (refused)" if status_d in (401, 403)
            else f"FAILED; {status_d}: the token is not enforced",
        ))  # fmt: skip
    except RehearsalError as err:
        rows.append(Row(f"rayservice {service.name}", how, time.monotonic() - began,
                        f"FAILED; {err}"))  # fmt: skip
    finally:
        service.stop()
    return rows
