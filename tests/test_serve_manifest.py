"""k8s/ray/rayservice.yaml without a cluster: it renders, validates against KubeRay 1.7.0's
rayservices CRD (unknown fields refused, as the API server would silently prune them), its
serveConfigV2 is a valid Ray Serve config whose applications build, one per workload's default
model name, and its pods take the MLflow endpoint and credentials from the platform's ConfigMap
and Secret."""

from __future__ import annotations

import copy
import importlib.util

import jsonschema
import pytest
import yaml
from conftest import REPO

KUBERAY = "kuberay-v1.7.0"
CRD_PLACES = [
    REPO / "tests" / "data" / KUBERAY / "ray.io_rayservices.yaml",
    REPO / "tests" / "data" / KUBERAY / "crds" / "ray.io_rayservices.yaml",
    REPO.parent / "shared" / "vendor" / KUBERAY / "crds" / "ray.io_rayservices.yaml",
]
CRD = next((p for p in CRD_PLACES if p.exists()), None)
pytestmark = pytest.mark.skipif(CRD is None, reason=f"no {KUBERAY} rayservices CRD found")
MANIFEST = REPO / "k8s" / "ray" / "rayservice.yaml"


def _render_module():
    spec = importlib.util.spec_from_file_location("k8s_render", REPO / "k8s" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()
# Rendering needs every secret set; none of them may appear in this manifest.
DUMMY_SECRETS = {name: f"{name.lower()}-dummy" for name in render.SECRETS}


def _strict(schema: object) -> object:
    """The CRD's schema with unknown fields refused wherever it lists the known ones."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(v1["schema"]["openAPIV3Schema"])


def validate(doc: dict, schema: dict) -> None:
    jsonschema.Draft202012Validator(schema).validate(doc)


@pytest.fixture(scope="module")
def service() -> dict:
    [doc] = render.render([MANIFEST], env=DUMMY_SECRETS)
    return doc


def test_the_rayservice_validates_against_kuberay_1_7(service, schema):
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    validate(service, schema)
    image = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert "${" not in image["containers"][0]["image"]


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (["spec", "serveConfigV2"], {"applications": []}, "is not of type 'string'"),
        (["spec", "rayClusterConfig", "workerGroupSpecs", 0, "replicas"], "two", "not of type"),
        (["spec", "serveConfig"], "applications: []", "Additional properties"),
        (["spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"], 0,
         "not of type"),
    ],
)  # fmt: skip
def test_the_schema_refuses_broken_services(service, schema, path, value, expected):
    doc = copy.deepcopy(service)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match=expected):
        validate(doc, schema)


def test_serve_config_builds_one_application_per_workload_model(service):
    from ray.serve.schema import ServeDeploySchema

    from flyray.serve.app import build
    from workflows import clip, image_classification, recommendation, tabular

    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    defaults = {w.DEFAULT_REGISTRATION.model_name
                for w in (recommendation, tabular, image_classification, clip)}  # fmt: skip
    apps = {a.name: a for a in config.applications}
    assert set(apps) == defaults
    for name, app in apps.items():
        assert app.route_prefix == f"/{name}" and app.args["model_name"] == name
        assert app.import_path == "flyray.serve.app:build"
        deployment = build({**app.args, "tracking_uri": "http://mlflow:5000"})
        assert deployment._bound_deployment.name == name  # builds without a cluster


def test_pods_read_mlflow_and_credentials_from_the_platform(service):
    """envFrom names the ConfigMap that holds MLFLOW_TRACKING_URI and the S3 Secret, as
    declared in k8s/; no value of either is in the manifest; pods are hardened."""
    platform = render.render(
        [REPO / "k8s" / "ray" / "raycluster.yaml", REPO / "k8s" / "secrets.template.yaml"],
        env=DUMMY_SECRETS,
    )
    config_maps = {d["metadata"]["name"]: d for d in platform if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"] for d in platform if d["kind"] == "Secret"
               and d["metadata"]["namespace"] == "flyray"}  # fmt: skip
    identities = {d["metadata"]["name"]: d["stringData"].get("MLFLOW_TRACKING_USERNAME")
                  for d in platform if d["kind"] == "Secret"}  # fmt: skip
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            refs = container["envFrom"]
            [config_map] = [r["configMapRef"]["name"] for r in refs if "configMapRef" in r]
            held = [r["secretRef"]["name"] for r in refs if "secretRef" in r]
            assert "MLFLOW_TRACKING_URI" in config_maps[config_map]["data"]
            assert set(held) <= secrets
            # MLflow as the read-only serving identity (flyray/registry_auth.py)
            assert identities[held[-1]] == "flyray-serving"
            assert "flyray-s3" not in held  # no S3 keys: models come through MLflow's proxy
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert not {"MLFLOW_TRACKING_URI", "AWS_SECRET_ACCESS_KEY"} & set(env)
            assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    assert cluster["authOptions"]["secretName"] in {
        d["metadata"]["name"] for d in platform if d["kind"] == "Secret"
    }
    assert "dummy" not in yaml.safe_dump(service)
