"""The network policies (k8s/network.yaml and the task namespaces' templates), evaluated as
Kubernetes evaluates them: who may reach whom, on which port. Their schema is checked by
`make cluster-check`; this checks what they allow and refuse."""

from __future__ import annotations

import pytest

from k8s import check, render
from tests.conftest import REPO

TASKS = "flyray-development"
SECRETS = {name: "x" for name in render.SECRETS}


def _policies() -> list[dict]:
    docs = render.render([REPO / "k8s" / f for f in render.PLATFORM], env=SECRETS)
    docs += check.cluster_resource_templates(check.flyte_values(), TASKS)
    return [d for d in docs if d["kind"] == "NetworkPolicy"]


def _namespace_labels() -> dict[str, dict]:
    docs = render.render([REPO / "k8s" / "namespace.yaml"], env=SECRETS)
    docs += check.cluster_resource_templates(check.flyte_values(), TASKS)
    labels = {d["metadata"]["name"]: d["metadata"].get("labels", {}) for d in docs
              if d["kind"] == "Namespace"}  # fmt: skip
    for name in ("kube-system", "flyte", "kuberay-system", "default", *labels):
        labels.setdefault(name, {})["kubernetes.io/metadata.name"] = name
    return labels


POLICIES, NAMESPACES = _policies(), _namespace_labels()


def _selects(selector: dict | None, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).get("matchLabels", {}).items())


def _peer(peer: dict, namespace: str, other: tuple[str, dict]) -> bool:
    """Whether `other` (namespace, pod labels) is this policy peer, for a policy in `namespace`."""
    other_ns, other_labels = other
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], NAMESPACES[other_ns]):
            return False
    elif other_ns != namespace:
        return False
    return _selects(peer.get("podSelector"), other_labels)


def _port(rule: dict, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(
        p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports
    )


def _side(pod: tuple[str, dict], other: tuple[str, dict], port: int, proto: str, kind: str) -> bool:
    """Whether the policies of `pod`'s namespace let it send (Egress) or receive (Ingress)."""
    namespace, labels = pod
    chosen = [p for p in POLICIES if p["metadata"]["namespace"] == namespace
              and kind in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], labels)]  # fmt: skip
    if not chosen:
        return True  # no policy selects it: Kubernetes allows everything
    key, peers = ("egress", "to") if kind == "Egress" else ("ingress", "from")
    return any(
        _port(rule, port, proto)
        and (peers not in rule or any(_peer(p, namespace, other) for p in rule[peers]))
        for policy in chosen
        for rule in policy["spec"].get(key, [])
    )


def reaches(src: tuple[str, dict], dst: tuple[str, dict], port: int, proto: str = "TCP") -> bool:
    return _side(src, dst, port, proto, "Egress") and _side(dst, src, port, proto, "Ingress")


MLFLOW = ("flyray", {"app.kubernetes.io/name": "mlflow"})
MINIO = ("flyray", {"app.kubernetes.io/name": "minio"})
POSTGRES = ("flyray", {"app.kubernetes.io/name": "postgres"})
SERVE = ("flyray", {"app.kubernetes.io/name": "flyray-serve", "ray.io/is-ray-node": "yes"})
TASK = (TASKS, {"flyte": "task"})
RAY_HEAD = (TASKS, {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head"})
RAY_WORKER = (TASKS, {"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker"})
DNS = ("kube-system", {"k8s-app": "kube-dns"})
FLYTE = ("flyte", {"app.kubernetes.io/name": "flyte-binary"})
OPERATOR = ("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
STRANGER = ("default", {"app": "anything"})

MATRIX = [
    # (who, whom, port, allowed)
    ("task", TASK, MLFLOW, 5000, True),
    ("task", TASK, MINIO, 9000, True),
    ("ray worker", RAY_WORKER, MLFLOW, 5000, True),
    ("task", TASK, POSTGRES, 5432, False),
    ("task", TASK, MLFLOW, 5432, False),
    ("task", TASK, STRANGER, 443, False),
    ("ray worker", RAY_WORKER, RAY_HEAD, 6379, True),
    ("the RayJob's submitter", TASK, RAY_HEAD, 8265, True),
    ("the KubeRay operator", OPERATOR, RAY_HEAD, 8265, True),
    ("a task pod, on GCS", TASK, RAY_HEAD, 6379, False),
    ("another namespace", STRANGER, RAY_HEAD, 8265, False),
    ("serving", SERVE, MLFLOW, 5000, True),
    ("serving (models come through MLflow)", SERVE, MINIO, 9000, False),
    ("serving", SERVE, POSTGRES, 5432, False),
    ("a client", STRANGER, SERVE, 8000, True),
    ("another namespace, on GCS", STRANGER, SERVE, 6379, False),
    ("a task, on serving's GCS", TASK, SERVE, 6379, False),
    ("mlflow", MLFLOW, POSTGRES, 5432, True),
    ("mlflow", MLFLOW, MINIO, 9000, True),
    ("mlflow", MLFLOW, TASK, 8080, False),
    ("flyte-binary", FLYTE, POSTGRES, 5432, True),
    ("flyte-binary", FLYTE, MINIO, 9000, True),
    ("another namespace", STRANGER, MLFLOW, 5000, False),
    ("another namespace", STRANGER, MINIO, 9000, False),
    ("another namespace", STRANGER, POSTGRES, 5432, False),
    ("minio", MINIO, MLFLOW, 5000, False),
]


@pytest.mark.parametrize("who, src, dst, port, allowed", MATRIX,
                         ids=[f"{m[0]}:{m[3]}" for m in MATRIX])  # fmt: skip
def test_who_reaches_whom(who, src, dst, port, allowed):
    assert reaches(src, dst, port) == allowed


def test_every_flyray_namespace_denies_by_default_and_resolves_names():
    for namespace in ("flyray", TASKS):
        [deny] = [p for p in POLICIES if p["metadata"]["namespace"] == namespace
                  and p["metadata"]["name"] == "default-deny"]  # fmt: skip
        assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for pod in (TASK, RAY_WORKER, MLFLOW, SERVE, MINIO):
        assert reaches(pod, DNS, 53, "UDP"), pod
    assert NAMESPACES[TASKS]["pod-security.kubernetes.io/enforce"] == "restricted"
