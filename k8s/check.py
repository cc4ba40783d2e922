"""The offline cluster check: render every manifest of k8s/ and every Ray job that Flyte would
create for the registered workflows, and validate each against the schemas the cluster applies.

    make cluster-check            # = python -m k8s.check (from the repository root)

Ray objects (RayCluster, RayJob, RayService) are checked against the CRDs of the KubeRay version
pinned in the Makefile (KUBERAY_VERSION), vendored under tests/data/kuberay-v<version>/, with
unknown fields rejected as `kubectl apply` (strict field validation) rejects them, plus the
rules KubeRay's operator enforces when it reconciles (which a CRD cannot express); everything
else against the kubernetes-validate package's strict schemas for Kubernetes K8S_VERSION. The CRDs'
CEL rules (x-kubernetes-validations) are left to the API server. Secrets that are not set in the
environment are filled with dummy values: the check needs no credential and prints none.
Exit status 1 when anything fails; the report names the object, the field and the problem.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import pkgutil
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

from k8s import render

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.30"
K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
RAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
# What KubeRay's RayJob controller accepts as spec.submissionMode (the CRD leaves it a string).
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
INT32 = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
# The namespace and name a Flyte execution gives a RayJob (shape only: Flyte derives them).
FLYTE_NAMESPACE, FLYTE_JOB_NAME = "flyray-development", "f1a2b3c4d5e6f7a8b9c0-n0-0"


def kuberay_version() -> str:
    pin = re.search(r"^KUBERAY_VERSION\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    return pin.group(1)


def crd_dir() -> Path:
    return REPO / "tests" / "data" / f"kuberay-v{kuberay_version()}"


@functools.cache
def k8s_registry() -> Registry:
    """Kubernetes' strict definitions, so that schemas can $ref e.g. ObjectMeta or PodSpec."""
    defs = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    contents = json.loads(
        (defs / f"v{K8S_VERSION}.0-local-strict" / "_definitions.json").read_text()
    )
    return Resource.from_contents(contents) @ Registry()


def _structural(node):
    """A CRD's OpenAPI v3 schema as JSON Schema: int-or-string and nullable spelled out, int32/64
    bounds made checks, and objects closed to fields the CRD does not declare (the API server's
    strict field validation) unless the CRD preserves unknown fields."""
    if isinstance(node, list):
        return [_structural(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if node.get("format") in INT32 and node.get("type") == "integer":
        low, high = INT32[node["format"]]
        out.setdefault("minimum", low)
        out.setdefault("maximum", high)
    if node.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    out.pop("nullable", None)
    closed = "properties" in node and "additionalProperties" not in node
    if closed and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str) -> dict:
    """The ray.io/v1 schema of `kind` from the vendored CRD, metadata as Kubernetes' ObjectMeta."""
    path = crd_dir() / f"ray.io_{RAY_KINDS[kind]}.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _structural(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {
        "$ref": K8S_DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    }
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = ["apiVersion", "kind", "metadata"]
    return schema


def operator_rules(doc: dict) -> Iterator[str]:
    """What KubeRay's operator rejects when it reconciles (ray-operator/controllers/ray/utils/
    validation.go) and a CRD cannot say."""
    spec = doc.get("spec") or {}
    if doc["kind"] == "RayJob":
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            yield "spec: one of rayClusterSpec or clusterSelector must be set"
        if spec.get("clusterSelector") and spec.get("shutdownAfterJobFinishes"):
            yield "spec.shutdownAfterJobFinishes: not allowed with clusterSelector"
        if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            mode = spec["submissionMode"]
            yield f"spec.submissionMode: {mode!r} is not one of {list(SUBMISSION_MODES)}"
        clusters = (
            [("spec.rayClusterSpec", spec["rayClusterSpec"])] if spec.get("rayClusterSpec") else []
        )
    elif doc["kind"] == "RayService":
        clusters = (
            [("spec.rayClusterConfig", spec["rayClusterConfig"])]
            if spec.get("rayClusterConfig")
            else []
        )
    else:
        clusters = [("spec", spec)]
    for where, cluster in clusters:
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            least, most = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            replicas = group.get("replicas", least)
            if isinstance(replicas, int) and not least <= replicas <= most:
                group_at = f"{where}.workerGroupSpecs[{i}]"
                yield f"{group_at}: replicas {replicas} outside [{least}, {most}]"
        auth = cluster.get("authOptions") or {}
        if auth.get("mode") == "token" and auth.get("enableK8sTokenAuth"):
            yield f"{where}.authOptions: enableK8sTokenAuth replaces the token mode, set one"


def _schema_errors(validator: jsonschema.protocols.Validator, doc: dict) -> list[str]:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{_path(e.absolute_path)}: {e.message}" for e in errors[:5]]


def _path(parts) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
    return text.lstrip(".") or "(document)"


def problems(doc: dict) -> list[str]:
    """Everything wrong with one Kubernetes object (empty: it would be accepted)."""
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        return ["(document): not a Kubernetes object (no kind/apiVersion)"]
    if doc["apiVersion"].startswith("ray.io/"):
        if doc["kind"] not in RAY_KINDS or doc["apiVersion"] != "ray.io/v1":
            return [f"apiVersion/kind: {doc['apiVersion']} {doc['kind']} is not served by KubeRay"]
        validator = jsonschema.Draft202012Validator(
            crd_schema(doc["kind"]), registry=k8s_registry()
        )
        found = _schema_errors(validator, doc)
        return found or list(operator_rules(doc))
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except jsonschema.ValidationError as err:
        return [f"{_path(err.absolute_path)}: {err.message}"]
    except kubernetes_validate.ValidationError as err:
        return [str(err)]
    return []


def validate(doc: dict) -> None:
    """Raise jsonschema.ValidationError naming the first problem of `doc`."""
    found = problems(doc)
    if found:
        raise jsonschema.ValidationError("; ".join(found))


def validate_definition(name: str, value: dict) -> None:
    """Validate against one Kubernetes type, e.g. io.k8s.api.core.v1.PodSpec."""
    validator = jsonschema.Draft202012Validator({"$ref": K8S_DEFS + name}, registry=k8s_registry())
    validator.validate(value)


# ------------------------------------------------------------------------------ the objects


def check_env() -> dict[str, str]:
    """The environment rendering sees: unset secrets get dummy values (never printed)."""
    return {
        **{name: f"cluster-check-{name.lower()}" for name in render.SECRETS},
        **{k: v for k, v in os.environ.items() if v},
    }


def manifest_paths() -> list[Path]:
    """The platform and standalone manifests in apply order, then any other manifest in k8s/
    (e.g. a RayService); Helm values are not manifests."""
    listed = [REPO / "k8s" / f for f in render.PLATFORM + render.STANDALONE]
    others = sorted(
        p
        for p in (REPO / "k8s").rglob("*.yaml")
        if p not in listed and "helm" not in p.relative_to(REPO / "k8s").parts
    )
    return listed + others


def manifests(env: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """(file, document) for every rendered manifest."""
    env = check_env() if env is None else env
    return [
        (str(path.relative_to(REPO)), doc)
        for path in manifest_paths()
        for doc in render.render([path], env=env)
    ]


def flyte_values() -> dict:
    return yaml.safe_load((REPO / "k8s" / "helm" / "flyte-binary.values.yaml").read_text())


def cluster_resource_templates(values: dict, namespace: str = FLYTE_NAMESPACE) -> list[dict]:
    """flyte-binary's per-namespace templates, as Flyte fills them for one namespace."""
    inline = values["clusterResourceTemplates"]["inline"]
    return [yaml.safe_load(t.replace("{{ namespace }}", namespace)) for t in inline.values()]


def workflow_entities() -> list:
    """Every workflow and launch plan of workflows/ (what `pyflyte register workflows` finds)."""
    from flytekit.core.launch_plan import LaunchPlan
    from flytekit.core.workflow import WorkflowBase

    import workflows

    found = []
    for info in pkgutil.iter_modules(workflows.__path__):
        module = importlib.import_module(f"workflows.{info.name}")
        found += [
            obj
            for obj in vars(module).values()
            if isinstance(obj, WorkflowBase | LaunchPlan) and obj not in found
        ]
    return found


def serialization_settings():
    """The settings every serialization of flyray uses (a registration's project and domain)."""
    from flytekit.configuration import ImageConfig, SerializationSettings

    return SerializationSettings(
        image_config=ImageConfig.auto_default_image(),
        project="flyray",
        domain="development",
        version="check",
    )


def serialize() -> dict:
    """Every entity registration sends, by id (flytekit models): the workflows and launch plans
    of workflows/, their tasks, and the Ray trainers that their sizing @dynamic starts at run
    time."""
    from collections import OrderedDict

    from flytekit.core.base_task import PythonTask
    from flytekit.tools.translator import get_serializable

    import tasks

    settings = serialization_settings()
    out: OrderedDict = OrderedDict()
    for entity in workflow_entities():
        get_serializable(out, settings, entity)
    for info in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, PythonTask) and obj.task_type == "ray":
                get_serializable(out, settings, obj)
    return out


def serialized_tasks() -> list:
    """The task templates registration sends (TaskTemplate models), one per task."""
    from flytekit.models.task import TaskSpec

    return [v.template for v in serialize().values() if isinstance(v, TaskSpec)]


def _integral(node):
    """Protobuf Structs carry every number as a float; Kubernetes' integer fields want ints."""
    if isinstance(node, dict):
        return {k: _integral(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_integral(v) for v in node]
    return int(node) if isinstance(node, float) and node.is_integer() else node


def flyte_rayjob(template, plugin: dict) -> dict:
    """The RayJob that Flyte's Ray plugin (flyteplugins go/tasks/plugins/k8s/ray BuildResource)
    makes of a registered Ray task: the task's head and worker pods with the task's image and
    environment in their primary container, the plugin's head settings, the task's command as the
    entrypoint. Hand-written: the plugin is Go run by propeller and nothing renders it offline."""
    custom, container = template.custom, template.container
    env = [{"name": k, "value": v} for k, v in (container.env or {}).items()]

    def pod(k8s_pod: dict) -> dict:
        spec = _integral(copy.deepcopy(k8s_pod["podSpec"]))
        [primary] = [c for c in spec["containers"] if c["name"] == k8s_pod["primaryContainerName"]]
        primary.update(image=container.image, env=[*env, *primary.get("env", [])])
        return {"metadata": k8s_pod.get("metadata") or {}, "spec": spec}

    cluster = custom["rayCluster"]
    head = cluster["headGroupSpec"]
    head_params = {
        **head.get("rayStartParams", {}),
        "disable-usage-stats": "true",
        "include-dashboard": str(plugin.get("includeDashboard", True)).lower(),
        "dashboard-host": plugin.get("dashboardHost", "0.0.0.0"),
    }
    workers = [
        {
            "groupName": g["groupName"],
            "replicas": int(g["replicas"]),
            "minReplicas": int(g.get("minReplicas", g["replicas"])),
            "maxReplicas": int(g.get("maxReplicas", g["replicas"])),
            "rayStartParams": {**g.get("rayStartParams", {}), "disable-usage-stats": "true"},
            "template": pod(g["k8sPod"]),
        }
        for g in cluster["workerGroupSpec"]
    ]
    spec = {
        "rayClusterSpec": {
            "headGroupSpec": {
                "rayStartParams": head_params,
                "template": pod(head["k8sPod"]),
                "serviceType": plugin.get("serviceType", "ClusterIP"),
            },
            "workerGroupSpecs": workers,
            "enableInTreeAutoscaling": bool(cluster.get("enableAutoscaling", False)),
        },
        "entrypoint": " ".join(container.args),
        "shutdownAfterJobFinishes": bool(custom.get("shutdownAfterJobFinishes", False)),
        "ttlSecondsAfterFinished": int(
            custom.get("ttlSecondsAfterFinished", plugin.get("ttlSecondsAfterFinished", 0))
        ),
    }
    if custom.get("runtimeEnvYAML"):
        spec["runtimeEnvYAML"] = custom["runtimeEnvYAML"]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "spec": spec,
        "metadata": {
            "name": FLYTE_JOB_NAME,
            "namespace": FLYTE_NAMESPACE,
            "labels": {"task-name": template.id.name.split(".")[-1][:63]},
        },
    }


def flyte_ray_jobs(templates: list | None = None) -> list[tuple[object, dict]]:
    """(task template, RayJob) for every registered Ray task."""
    plugin = flyte_values()["configuration"]["inline"]["plugins"]["ray"]
    templates = serialized_tasks() if templates is None else templates
    return [(t, flyte_rayjob(t, plugin)) for t in templates if t.type == "ray"]


# ------------------------------------------------------------------------------ the report


def _describe(template) -> str:
    meta = template.metadata
    timeout = meta.timeout.total_seconds() / 3600 if meta.timeout else 0
    [group, *_] = template.custom["rayCluster"]["workerGroupSpec"]
    [worker] = group["k8sPod"]["podSpec"]["containers"]
    gpus = worker["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
    span = f"{int(group.get('minReplicas', group['replicas']))}-{int(group['replicas'])}"
    return (
        f"workers {span:>5}  gpu {gpus!s:>2}  timeout {timeout:4.1f}h  "
        f"{'interruptible' if meta.interruptible else '-'}"
    )


def main() -> int:
    version, failed, checked = kuberay_version(), 0, 0
    print(
        f"cluster-check: KubeRay {version} CRDs ({crd_dir().relative_to(REPO)}), "
        f"Kubernetes {K8S_VERSION} schemas, strict (unknown fields rejected)"
    )

    def report(label: str, doc: dict, detail: str = "") -> None:
        nonlocal failed, checked
        found = problems(doc)
        checked += 1
        failed += bool(found)
        name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        print(f"  {'FAIL' if found else 'ok  '}  {label:<34} {name:<46} {detail}".rstrip())
        for problem in found:
            print(f"        {problem}")

    try:
        rendered = manifests()
    except render.RenderError as err:
        print(f"render: {err}")
        return 1
    print("\nManifests (rendered as k8s/render.py renders them for kubectl apply)")
    for path, doc in rendered:
        report(path, doc)
    print("\nflyte-binary cluster resource templates (per project-domain namespace)")
    for doc in cluster_resource_templates(flyte_values()):
        report("k8s/helm/flyte-binary.values.yaml", doc)
    print("\nRay jobs of the registered Flyte tasks (as Flyte's Ray plugin creates them)")
    jobs = flyte_ray_jobs()
    for template, job in jobs:
        report(template.id.name.removeprefix("tasks."), job, _describe(template))
    print(
        f"\n{checked} objects checked ({len(jobs)} Flyte Ray jobs): "
        f"{'all valid' if not failed else f'{failed} FAILED'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
