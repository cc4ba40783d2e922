"""k8s/ without a cluster: every manifest renders and validates against its schema.

Kubernetes objects: the kubernetes-validate package's strict JSON schemas for Kubernetes
K8S_VERSION. RayCluster/RayJob: KubeRay's ray.io/v1 schema, vendored under tests/data/ for the
operator version the Makefile pins. The Ray pods that Flyte's Ray tasks ask for are checked too.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from tests.conftest import REPO
from tests.test_serialization import SETTINGS, workflow_entities

K8S_VERSION = "1.30"
KUBERAY_VERSION = re.search(r"^KUBERAY_VERSION\s*:=\s*(\S+)", (REPO / "Makefile").read_text(),
                            re.M).group(1)  # fmt: skip
KUBERAY_SCHEMA = REPO / "tests" / "data" / f"kuberay-v{KUBERAY_VERSION}" / "ray.io_v1.schema.yaml"
K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
DUMMY_SECRETS = {
    "MINIO_ROOT_USER": "root-user-dummy",
    "MINIO_ROOT_PASSWORD": "root-password-dummy",
    "FLYRAY_S3_ACCESS_KEY": "access-key-dummy",
    "FLYRAY_S3_SECRET_KEY": "secret-key-dummy",
    "POSTGRES_PASSWORD": "postgres-password-dummy",
}


def _load_render():
    spec = importlib.util.spec_from_file_location("k8s_render", REPO / "k8s" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


def _registry() -> Registry:
    defs = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    contents = json.loads(
        (defs / f"v{K8S_VERSION}.0-local-strict" / "_definitions.json").read_text()
    )
    return Resource.from_contents(contents) @ Registry()


REGISTRY = _registry()
KUBERAY = yaml.safe_load(KUBERAY_SCHEMA.read_text())


def validate_kuberay(doc: dict) -> None:
    schema = {**KUBERAY["kinds"][doc["kind"]], "definitions": KUBERAY["definitions"]}
    jsonschema.Draft202012Validator(schema, registry=REGISTRY).validate(doc)


def validate_k8s(doc: dict) -> None:
    if doc["apiVersion"] == "ray.io/v1":
        validate_kuberay(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def validate_definition(name: str, value: dict) -> None:
    """Validate against one Kubernetes type, e.g. io.k8s.api.core.v1.PodSpec."""
    jsonschema.Draft202012Validator({"$ref": K8S_DEFS + name}, registry=REGISTRY).validate(value)


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    paths = [REPO / "k8s" / f for f in render.PLATFORM + render.STANDALONE]
    return render.render(paths, env=DUMMY_SECRETS)


@pytest.fixture(scope="module")
def flyte_values() -> dict:
    return yaml.safe_load((REPO / "k8s" / "helm" / "flyte-binary.values.yaml").read_text())


def _cluster_resource_templates(values: dict) -> list[dict]:
    """flyte-binary's per-namespace templates, as Flyte fills them for one namespace."""
    inline = values["clusterResourceTemplates"]["inline"]
    return [yaml.safe_load(t.replace("{{ namespace }}", "flyray-development"))
            for t in inline.values()]  # fmt: skip


def test_every_manifest_validates_against_its_schema(manifests, flyte_values):
    kinds = [d["kind"] for d in manifests]
    assert {"Namespace", "Secret", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
            "Job", "RayCluster", "RayJob"} <= set(kinds)  # fmt: skip
    for doc in manifests + _cluster_resource_templates(flyte_values):
        validate_k8s(doc)


@pytest.mark.parametrize(
    "kind, path, value, expected",
    [
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "replicas"], "two", "is not of type"),
        ("RayCluster", ["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0, "not of type"),
        ("RayCluster", ["spec", "headGroupSpec", "replicas"], 1, "Additional properties"),
        ("RayJob", ["spec", "submissionMode"], "K8sJob", "is not one of"),
        ("Deployment", ["spec", "template", "spec", "containers", 0, "resources", "limit"], {},
         "Additional properties"),
        ("Service", ["spec", "ports", 0, "port"], "5000x", "is not of type"),
    ],
)  # fmt: skip
def test_the_schemas_reject_broken_manifests(manifests, kind, path, value, expected):
    doc = copy.deepcopy(next(d for d in manifests if d["kind"] == kind))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match=expected):
        validate_k8s(doc)


def test_a_rayjob_must_bring_or_select_a_cluster(manifests):
    job = copy.deepcopy(next(d for d in manifests if d["kind"] == "RayJob"))
    del job["spec"]["clusterSelector"]
    with pytest.raises(jsonschema.ValidationError):
        validate_kuberay(job)


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "Job"):
        return [spec["template"]["spec"]]
    if doc["kind"] == "RayCluster":
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        return [g["template"]["spec"] for g in groups]
    if doc["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]["spec"]]
    if doc["kind"] == "PodTemplate":
        return [doc["template"]["spec"]]
    return []


def _assert_hardened(pod: dict, where: str, needs_resources: bool = True) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True, where
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"]["drop"] == ["ALL"], where
        if needs_resources:
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), where


def test_every_pod_is_non_root_and_bounded(manifests, flyte_values):
    pods = [(d["metadata"]["name"], p) for d in manifests for p in _pod_specs(d)]
    assert len(pods) >= 7  # postgres, minio, mlflow, buckets job, ray head+worker, submitter
    for name, pod in pods:
        _assert_hardened(pod, name)
    [task_defaults] = [
        d for d in _cluster_resource_templates(flyte_values) if d["kind"] == "PodTemplate"
    ]
    # Flyte merges the task's own resources into its pods, so the default template sets none.
    _assert_hardened(_pod_specs(task_defaults)[0], "flyray-task-defaults", needs_resources=False)


def test_nothing_is_exposed_outside_the_cluster(manifests, flyte_values):
    assert not [d for d in manifests if d["kind"] == "Ingress"]
    for service in (d for d in manifests if d["kind"] == "Service"):
        assert service["spec"]["type"] == "ClusterIP", service["metadata"]["name"]
    [cluster] = [d for d in manifests if d["kind"] == "RayCluster"]
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["spec"]["headGroupSpec"]["enableIngress"] is False
    assert flyte_values["configuration"]["inline"]["plugins"]["ray"]["serviceType"] == "ClusterIP"


def test_secret_templates_hold_no_values():
    raw = [d for d in yaml.safe_load_all((REPO / "k8s" / "secrets.template.yaml").read_text()) if d]
    assert {d["kind"] for d in raw} == {"Secret"}
    leaves = []
    for secret in raw:
        for key, value in secret["stringData"].items():
            parsed = yaml.safe_load(value)
            if isinstance(parsed, dict):  # flyte-binary's config blocks: check every leaf
                stack = [parsed]
                while stack:
                    node = stack.pop()
                    for v in node.values():
                        stack.append(v) if isinstance(v, dict) else leaves.append(v)
            elif key != "POSTGRES_USER":  # a user name, not a credential
                leaves.append(value)
    assert leaves and all(render.PLACEHOLDER.fullmatch(v) for v in leaves), leaves
    assert {render.PLACEHOLDER.fullmatch(v).group(1) for v in leaves} == set(render.SECRETS)
    for other in (REPO / "k8s").rglob("*.yaml"):  # no Secret lives anywhere else
        docs = [d for d in yaml.safe_load_all(other.read_text()) if d]
        if other.name != "secrets.template.yaml":
            assert all(d.get("kind") != "Secret" for d in docs), other


def test_rendering_fills_secrets_only_from_the_environment(manifests):
    secrets = {(d["metadata"]["namespace"], d["metadata"]["name"]): d["stringData"]
               for d in manifests if d["kind"] == "Secret"}  # fmt: skip
    s3 = secrets[("flyray-development", "flyray-s3")]
    assert s3["AWS_ACCESS_KEY_ID"] == s3["aws_access_key_id"] == "access-key-dummy"
    assert (
        "postgres-password-dummy"
        in secrets[("flyte", "flyte-binary-secrets")]["202-database-secrets.yaml"]
    )
    # Shell variables in container commands are left for the shell.
    [mc] = [d for d in manifests if d["kind"] == "Job"][0]["spec"]["template"]["spec"]["containers"]
    assert '"$MINIO_ROOT_PASSWORD"' in mc["args"][0]


def test_render_refuses_a_missing_secret_and_prints_no_value(tmp_path):
    env = {**DUMMY_SECRETS, "PATH": "/usr/bin:/bin"}
    del env["POSTGRES_PASSWORD"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "k8s" / "render.py"), "platform"],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "POSTGRES_PASSWORD is not set" in proc.stderr
    assert not [v for v in DUMMY_SECRETS.values() if v in proc.stderr]


def test_standalone_cluster_matches_the_flyte_ray_settings(manifests):
    import images
    from tasks.platform import RAY_DEFAULTS

    [cluster] = [d for d in manifests if d["kind"] == "RayCluster"]
    [group] = cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == int(RAY_DEFAULTS["FLYRAY_RAY_WORKERS"])
    [worker] = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"] == {"cpu": RAY_DEFAULTS["FLYRAY_RAY_WORKER_CPU"],
                                             "memory": RAY_DEFAULTS["FLYRAY_RAY_WORKER_MEM"]}  # fmt: skip
    assert worker["image"] == images.standalone.image_name()
    assert cluster["spec"]["rayVersion"] == __import__("ray").__version__
    [mlflow] = [
        d for d in manifests if d["metadata"]["name"] == "mlflow" and d["kind"] == "Deployment"
    ]
    assert mlflow["spec"]["template"]["spec"]["containers"][0]["image"] == (
        images.mlflow_server.image_name()
    )


def test_helm_values_enable_the_ray_plugin_and_pin_kuberay(flyte_values):
    tasks = flyte_values["configuration"]["inline"]["tasks"]["task-plugins"]
    assert "ray" in tasks["enabled-plugins"]
    assert tasks["default-for-task-types"]["ray"] == "ray"
    [rule] = [r for r in flyte_values["rbac"]["extraRules"] if "ray.io" in r["apiGroups"]]
    assert rule["resources"] == ["rayjobs"]
    assert {"create", "get", "list", "watch", "patch", "update", "delete"} <= set(rule["verbs"])
    k8s_plugin = flyte_values["configuration"]["inline"]["plugins"]["k8s"]
    names = {d["metadata"]["name"] for d in _cluster_resource_templates(flyte_values)}
    assert k8s_plugin["default-pod-template-name"] in names
    kuberay = yaml.safe_load((REPO / "k8s" / "helm" / "kuberay-operator.values.yaml").read_text())
    assert kuberay["image"]["tag"] == f"v{KUBERAY_VERSION}"
    assert kuberay["securityContext"]["runAsNonRoot"] is True
    # No credential in Helm values: they come from the flyte-binary-secrets Secret.
    assert flyte_values["configuration"]["inlineSecretRef"] == "flyte-binary-secrets"
    text = (REPO / "k8s" / "helm" / "flyte-binary.values.yaml").read_text()
    assert not re.search(r"(password|secretKey|accessKey)\s*:", text)


def test_the_ray_pods_of_every_flyte_task_are_valid_and_hardened():
    from collections import OrderedDict

    from flytekit.models.task import TaskSpec
    from flytekit.tools.translator import get_serializable

    out: OrderedDict = OrderedDict()
    for entity in workflow_entities():
        get_serializable(out, SETTINGS, entity)
    ray_tasks = [v.template for v in out.values()
                 if isinstance(v, TaskSpec) and v.template.type == "ray"]  # fmt: skip
    assert len(ray_tasks) >= 5
    for template in ray_tasks:
        cluster = template.custom["rayCluster"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpec"]]
        for group in groups:
            pod = group["k8sPod"]["podSpec"]
            validate_definition("io.k8s.api.core.v1.PodSpec", pod)
            _assert_hardened(pod, template.id.name)
            [container] = pod["containers"]
            refs = [next(iter(e.values()))["name"] for e in container["envFrom"]]
            assert refs == ["flyray-env", "flyray-s3"]  # the ConfigMap and Secret of k8s/
