"""k8s/ and the Ray jobs of the registered tasks, without a cluster (what `make cluster-check`
runs, k8s/check.py): every manifest renders and validates against its schema, Kubernetes
objects against the kubernetes-validate package's strict schemas, Ray objects against the CRDs of
the KubeRay version the Makefile pins (vendored in tests/data/kuberay-v<version>/). Also what
registration fixes into the tasks and launch plans for the cluster: timeouts, interruptible,
GPU scheduling and the nightly failure notification.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import jsonschema
import pytest
import yaml
from conftest import REPO

from k8s import check, render

KUBERAY_VERSION = check.kuberay_version()
DUMMY_SECRETS = {
    **{name: f"{name.lower()}-dummy" for name in render.SECRETS},
    "MINIO_ROOT_USER": "root-user-dummy",
    "MINIO_ROOT_PASSWORD": "root-password-dummy",
    "FLYRAY_S3_ACCESS_KEY": "access-key-dummy",
    "FLYRAY_S3_SECRET_KEY": "secret-key-dummy",
    "POSTGRES_PASSWORD": "postgres-password-dummy",
    "FLYRAY_RAY_AUTH_TOKEN": "ray-token-dummy",
}
validate_k8s = check.validate


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return [doc for _, doc in check.manifests(env=DUMMY_SECRETS)]


@pytest.fixture(scope="module")
def flyte_values() -> dict:
    return check.flyte_values()


@pytest.fixture(scope="module")
def templates(task_templates) -> dict:
    """The registered task templates by short name."""
    return task_templates()


def test_kuberay_is_pinned_at_1_7_everywhere(flyte_values):
    assert KUBERAY_VERSION == "1.7.0"
    folder = check.crd_dir()
    assert {p.name for p in folder.glob("ray.io_*.yaml")} == {
        "ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml"}  # fmt: skip
    assert "v1.7.0" in (folder / "README.md").read_text()  # provenance
    for path in folder.glob("ray.io_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition"
        assert "v1" in [v["name"] for v in crd["spec"]["versions"] if v["served"]]
    ours = yaml.safe_load((REPO / "k8s" / "helm" / "kuberay-operator.values.yaml").read_text())
    chart = yaml.safe_load((folder / "kuberay-operator.values.yaml").read_text())
    assert ours["image"]["tag"] == chart["image"]["tag"] == f"v{KUBERAY_VERSION}"
    assert set(ours) <= set(chart), set(ours) - set(chart)  # every value is one the chart reads
    assert ours["securityContext"]["runAsNonRoot"] is True
    flyte = re.search(r"^FLYTE_VERSION\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    # the newest v1 release; its Ray plugin retries failed RayJob deployments (#7153, v1.16.6)
    assert flyte.group(1) == "v1.16.8"


def test_every_manifest_validates_against_its_schema(manifests, flyte_values):
    kinds = [d["kind"] for d in manifests]
    assert {"Namespace", "Secret", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
            "Job", "RayCluster", "RayJob"} <= set(kinds)  # fmt: skip
    for doc in manifests + check.cluster_resource_templates(flyte_values):
        assert check.problems(doc) == [], doc["metadata"]["name"]


@pytest.mark.parametrize(
    "kind, path, value, expected",
    [
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "replicas"], "two", "is not of type"),
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "replicas"], 9, "outside"),
        ("RayCluster", ["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0, "not of type"),
        ("RayCluster", ["spec", "headGroupSpec", "replicas"], 1, "Additional properties"),
        ("RayCluster", ["spec", "authOptions", "mode"], "password", "is not one of"),
        ("RayCluster", ["spec", "authOptions", "token"], "abc", "Additional properties"),
        ("RayJob", ["spec", "submissionMode"], "K8sJob", "is not one of"),
        ("RayJob", ["spec", "preRunningDeadlineSeconds"], 0, "less than the minimum"),
        ("RayJob", ["spec", "activeDeadlineSeconds"], 2**40, "greater than the maximum"),
        ("RayJob", ["spec", "shutdownAfterJobFinishes"], True, "not allowed with clusterSelector"),
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
    assert check.problems(job) == ["spec: one of rayClusterSpec or clusterSelector must be set"]


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "Job"):
        return [spec["template"]["spec"]]
    if doc["kind"] == "RayCluster":
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        return [g["template"]["spec"] for g in groups]
    if doc["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]["spec"]]
    if doc["kind"] == "RayService":
        return _pod_specs({"kind": "RayCluster", "spec": spec["rayClusterConfig"]})
    if doc["kind"] == "PodTemplate":
        return [doc["template"]["spec"]]
    return []


def _assert_hardened(pod: dict, where: str, needs_resources: bool = True) -> None:
    assert pod["automountServiceAccountToken"] is False, where  # no API token to steal
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
        d for d in check.cluster_resource_templates(flyte_values) if d["kind"] == "PodTemplate"
    ]
    # Flyte merges the task's own resources into its pods, so the default template sets none.
    _assert_hardened(_pod_specs(task_defaults)[0], "flyray-task-defaults", needs_resources=False)


# MinIO's server keeps a writable root: its start creates ${HOME}/.minio/certs, and no MinIO
# server runs on this machine to rehearse it read-only (moto stands in; docs/deploy.md).
WRITABLE_ROOT = {"minio"}


def test_root_filesystems_are_read_only_with_an_empty_dir_for_what_they_write(
    manifests, flyte_values, task_templates
):
    """Every flyray container but MinIO's server runs on a read-only root filesystem, with an
    emptyDir on /tmp and HOME and numba's cache inside a writable folder (the rehearsal runs
    Postgres, MLflow, every task pod and every Ray pod so: k8s/rehearse/pods.py)."""
    pods = [(d["metadata"]["name"], p) for d in manifests for p in _pod_specs(d)]
    [task_defaults] = [
        d for d in check.cluster_resource_templates(flyte_values) if d["kind"] == "PodTemplate"
    ]
    pods.append(("flyray-task-defaults", _pod_specs(task_defaults)[0]))
    for name, template in task_templates().items():
        if template.type == "ray":
            cluster = template.custom["rayCluster"]
            groups = [cluster["headGroupSpec"], *cluster["workerGroupSpec"]]
            pods += [(name, g["k8sPod"]["podSpec"]) for g in groups]
    assert {n for n, _ in pods} >= {"postgres", "mlflow", "flyray-serve", "fit_recommender"}
    for name, pod in pods:
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            read_only = container["securityContext"].get("readOnlyRootFilesystem", False)
            assert read_only is (name not in WRITABLE_ROOT), name
            if not read_only:
                continue
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], name
            env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
            for variable in ("HOME", "NUMBA_CACHE_DIR"):
                path = env.get(variable, "/tmp")  # unset: nothing of it runs there
                assert any(path.startswith(m) for m in mounts), (name, variable, path)


def test_nothing_is_exposed_outside_the_cluster(manifests, flyte_values):
    assert not [d for d in manifests if d["kind"] == "Ingress"]
    for service in (d for d in manifests if d["kind"] == "Service"):
        assert service["spec"]["type"] == "ClusterIP", service["metadata"]["name"]
    [cluster] = [d for d in manifests if d["kind"] == "RayCluster"]
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["spec"]["headGroupSpec"]["enableIngress"] is False
    assert flyte_values["configuration"]["inline"]["plugins"]["ray"]["serviceType"] == "ClusterIP"


def test_the_standalone_cluster_takes_its_ray_token_from_a_secret(manifests):
    """Token authentication on (authOptions), the token from the flyray-ray-auth Secret, filled
    only from the environment; no Ray object names the token itself."""
    [cluster] = [d for d in manifests if d["kind"] == "RayCluster"]
    auth = cluster["spec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "flyray-ray-auth"}
    [secret] = [d for d in manifests if d["kind"] == "Secret"
                and d["metadata"]["name"] == auth["secretName"]]  # fmt: skip
    assert secret["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    assert secret["stringData"] == {"auth_token": "ray-token-dummy"}  # the key KubeRay reads
    for doc in manifests:
        if doc["apiVersion"] == "ray.io/v1":
            assert "ray-token-dummy" not in json.dumps(doc), doc["kind"]
            assert "RAY_AUTH_TOKEN" not in json.dumps(doc), doc["kind"]  # KubeRay injects it
    [job] = [d for d in manifests if d["kind"] == "RayJob"]
    assert job["spec"]["preRunningDeadlineSeconds"] <= 3600  # a job stuck before running fails
    assert job["spec"]["activeDeadlineSeconds"] > job["spec"]["preRunningDeadlineSeconds"]


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
            elif key not in ("POSTGRES_USER", "MLFLOW_TRACKING_USERNAME", "username"):  # names
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
    assert ":$MINIO_ROOT_PASSWORD@" in mc["args"][0] and "password-dummy" not in mc["args"][0]


def test_render_refuses_a_missing_secret_and_prints_no_value(tmp_path):
    env = {**DUMMY_SECRETS, "PATH": "/usr/bin:/bin"}
    del env["FLYRAY_RAY_AUTH_TOKEN"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "k8s" / "render.py"), "platform"],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "FLYRAY_RAY_AUTH_TOKEN is not set" in proc.stderr
    assert not [v for v in DUMMY_SECRETS.values() if v in proc.stderr]


def test_standalone_cluster_matches_the_flyte_ray_settings(manifests):
    import images
    from tasks.deployment import RAY_DEFAULTS

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


def test_helm_values_enable_the_ray_plugin(flyte_values):
    tasks = flyte_values["configuration"]["inline"]["tasks"]["task-plugins"]
    assert "ray" in tasks["enabled-plugins"]
    assert tasks["default-for-task-types"]["ray"] == "ray"
    [rule] = [r for r in flyte_values["rbac"]["extraRules"] if "ray.io" in r["apiGroups"]]
    assert rule["resources"] == ["rayjobs"]
    assert {"create", "get", "list", "watch", "patch", "update", "delete"} <= set(rule["verbs"])
    k8s_plugin = flyte_values["configuration"]["inline"]["plugins"]["k8s"]
    names = {d["metadata"]["name"] for d in check.cluster_resource_templates(flyte_values)}
    assert k8s_plugin["default-pod-template-name"] in names
    # No credential in Helm values: they come from the flyte-binary-secrets Secret.
    assert flyte_values["configuration"]["inlineSecretRef"] == "flyte-binary-secrets"
    text = (REPO / "k8s" / "helm" / "flyte-binary.values.yaml").read_text()
    assert not re.search(r"(password|secretKey|accessKey)\s*:", text)


def test_the_ray_jobs_of_every_flyte_task_are_valid_and_hardened(templates):
    """The RayJob Flyte creates for each registered Ray task validates against KubeRay 1.7's
    RayJob CRD, and its pods against Kubernetes' PodSpec, non-root, with the k8s/ environment."""
    jobs = check.flyte_ray_jobs(list(templates.values()))
    assert len(jobs) >= 5
    for template, job in jobs:
        assert check.problems(job) == [], template.id.name
        cluster = job["spec"]["rayClusterSpec"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            check.validate_definition("io.k8s.api.core.v1.PodSpec", pod)
            _assert_hardened(pod, template.id.name)
            [container] = pod["containers"]
            refs = [next(iter(e.values()))["name"] for e in container["envFrom"]]
            # the ConfigMap and Secrets of k8s/: endpoints, S3 keys, the pipeline's MLflow identity
            assert refs == ["flyray-env", "flyray-s3", "flyray-mlflow-pipeline"]
        with pytest.raises(jsonschema.ValidationError, match="is not of type"):  # and it bites
            broken = copy.deepcopy(job)
            broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "2"
            check.validate(broken)


# ----------------------------------------------- what registration fixes for the cluster


def _documented_timeouts() -> dict[str, float]:
    """Task -> timeout in minutes, from the task-timeout table of docs/configuration.md."""
    text = (REPO / "docs" / "configuration.md").read_text()
    section = text.split("### Task timeouts", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (\d+) (min|h) \|", section, re.M)
    return {name: int(n) * (60 if unit == "h" else 1) for name, n, unit in rows}


# The @dynamic that sizes each trainer's Ray cluster per run -> the Ray trainer it starts.
SIZERS = {"train_recommender": "fit_recommender", "train_xgboost": "fit_xgboost",
          "train_distributed": "fit_cnn", "train_clip_classifier": "fit_clip_classifier"}  # fmt: skip


def test_every_task_has_its_documented_timeout(templates):
    documented = _documented_timeouts()
    fixed = {name: t.metadata.timeout.total_seconds() / 60 for name, t in templates.items()}
    assert all(minutes > 0 for minutes in fixed.values()), fixed
    assert {n: m for n, m in fixed.items() if n not in SIZERS} == documented
    # A dynamic's deadline covers its trainer, so each sizing @dynamic outlasts its trainer.
    for sizer, trainer in SIZERS.items():
        assert fixed[sizer] == fixed[trainer] + 10, sizer


def test_cached_cpu_tasks_are_interruptible_and_the_rest_are_not(templates):
    for name, template in templates.items():
        cached = template.metadata.discoverable
        gpus = template.type == "ray" and any(
            "nvidia.com/gpu" in json.dumps(g["k8sPod"])
            for g in template.custom["rayCluster"]["workerGroupSpec"])  # fmt: skip
        assert bool(template.metadata.interruptible) == (cached and not gpus), name
    assert templates["ingest_clickstream"].metadata.interruptible
    assert not templates["register_model"].metadata.interruptible  # uncached: never preempted


REGISTERED = """
import json, workflows
from k8s import check
from flytekit.configuration import SerializationSettings, ImageConfig
from flytekit.tools.translator import get_serializable
from collections import OrderedDict
import workflows.recommendation as rec
templates = {t.id.name.split(".")[-1]: t for t in check.serialized_tasks()}
out = OrderedDict()
get_serializable(out, SerializationSettings(image_config=ImageConfig.auto_default_image(),
                 project="p", domain="d", version="v"), rec.nightly_plan)
[plan] = [v for v in out.values() if type(v).__name__ == "LaunchPlan"]
jobs = {t.id.name.split(".")[-1]: job for t, job in check.flyte_ray_jobs(list(templates.values()))}
print(json.dumps({
    "jobs": jobs,
    "problems": {n: check.problems(j) for n, j in jobs.items()},
    "timeouts": {n: t.metadata.timeout.total_seconds() for n, t in templates.items()},
    "interruptible": {n: bool(t.metadata.interruptible) for n, t in templates.items()},
    "notifications": [n.to_flyte_idl().__str__() for n in plan.spec.entity_metadata.notifications],
    "phases": [list(n.phases) for n in plan.spec.entity_metadata.notifications],
    "emails": [list(n.email.recipients_email) for n in plan.spec.entity_metadata.notifications],
}))
"""


def _registered_with(**env: str) -> dict:
    """What registration sends when the deployment variables `env` are set (they are read when
    the modules are imported, so in a fresh process)."""
    full = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-c", REGISTERED], capture_output=True, text=True,
                          cwd=REPO, env=full, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gpu_deployment() -> dict:
    return _registered_with(
        FLYRAY_CLIP_WORKER_GPUS="1", FLYRAY_CNN_WORKER_GPUS="2",
        FLYRAY_GPU_TOLERATIONS='[{"key": "nvidia.com/gpu", "operator": "Equal", "value": "l4", '
                               '"effect": "NoSchedule"}, {"key": "spot", "operator": "Exists"}]',
        FLYRAY_GPU_NODE_SELECTOR='{"cloud.google.com/gke-accelerator": "nvidia-l4"}',
        FLYRAY_NIGHTLY_NOTIFY="ml-oncall@example.com, platform@example.com",
        FLYRAY_TIMEOUT_SCALE="1.5",
    )  # fmt: skip


def test_gpu_worker_groups_take_tolerations_and_node_selector_from_configuration(gpu_deployment):
    jobs, problems = gpu_deployment["jobs"], gpu_deployment["problems"]
    assert all(found == [] for found in problems.values()), problems  # valid for KubeRay 1.7
    gpu_groups = {"embed_images": 1, "fit_clip_classifier": 1, "fit_cnn": 2}
    for name, job in jobs.items():
        cluster = job["spec"]["rayClusterSpec"]
        head = cluster["headGroupSpec"]["template"]["spec"]
        assert "tolerations" not in head and "nodeSelector" not in head, name  # head: no GPU
        [worker] = cluster["workerGroupSpecs"]
        pod = worker["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        if name in gpu_groups:
            assert int(limits["nvidia.com/gpu"]) == gpu_groups[name], name
            assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
            assert pod["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Equal", "value": "l4",
                 "effect": "NoSchedule"}, {"key": "spot", "operator": "Exists"}]  # fmt: skip
        else:
            assert "nvidia.com/gpu" not in limits and "tolerations" not in pod, name
    # GPU tasks are not interruptible even though cached; the CPU tasks still are.
    assert not gpu_deployment["interruptible"]["embed_images"]
    assert gpu_deployment["interruptible"]["evaluate_clip_classifier"]


def test_timeouts_scale_with_the_deployment(gpu_deployment, templates):
    scaled = gpu_deployment["timeouts"]
    for name, template in templates.items():
        if name in SIZERS:  # the scaled trainer's timeout plus 10 minutes
            trainer = templates[SIZERS[name]].metadata.timeout.total_seconds()
            assert scaled[name] == pytest.approx(1.5 * trainer + 600)
            continue
        assert scaled[name] == pytest.approx(1.5 * template.metadata.timeout.total_seconds())


def test_the_nightly_plan_notifies_on_failure(gpu_deployment, templates):
    assert gpu_deployment["emails"] == [["ml-oncall@example.com", "platform@example.com"]]
    from flytekit.models.core.execution import WorkflowExecutionPhase as Phase

    [phases] = gpu_deployment["phases"]
    assert set(phases) == {Phase.FAILED, Phase.TIMED_OUT, Phase.ABORTED}
    assert Phase.SUCCEEDED not in phases
    import workflows.recommendation as rec  # registered here without FLYRAY_NIGHTLY_NOTIFY

    assert rec.nightly_plan.notifications == [] and rec.default_plan.notifications == []


def test_bad_deployment_settings_name_the_variable():
    from tasks.deployment import Deployment
    from tasks.raycluster import gpu_scheduling

    bad = {
        "FLYRAY_GPU_TOLERATIONS": ("[{key: nvidia}]", "FLYRAY_GPU_TOLERATIONS: not valid JSON"),
        "FLYRAY_GPU_NODE_SELECTOR": ('["a=b"]', "FLYRAY_GPU_NODE_SELECTOR: expected a JSON dict"),
        "FLYRAY_RAY_WORKERS": ("two", "FLYRAY_RAY_WORKERS: expected a int, got 'two'"),
        "FLYRAY_TIMEOUT_SCALE": ("x", "FLYRAY_TIMEOUT_SCALE: expected a float"),
    }
    for name, (value, message) in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            Deployment.from_env({name: value})
    with pytest.raises(ValueError, match=r"FLYRAY_GPU_TOLERATIONS\[0\]: expected a toleration"):
        Deployment.from_env({"FLYRAY_GPU_TOLERATIONS": '[{"keys": "nvidia.com/gpu"}]'})
    tolerations, selector = gpu_scheduling(Deployment.from_env({}))  # the GPU taint, no selector
    assert [(t.key, t.operator, t.effect) for t in tolerations] == [
        ("nvidia.com/gpu", "Exists", "NoSchedule")]  # fmt: skip
    assert selector is None
    given = Deployment.from_env({"FLYRAY_GPU_NODE_SELECTOR": '{"pool": "a100"}'})
    assert gpu_scheduling(given)[1] == {"pool": "a100"}


def test_make_cluster_check_reports_every_object(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "k8s.check"], capture_output=True, text=True,
                          cwd=REPO, timeout=600,
                          env={k: v for k, v in os.environ.items()
                               if k not in DUMMY_SECRETS})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert f"KubeRay {KUBERAY_VERSION} CRDs" in out
    assert re.search(r"ok\s+k8s/ray/raycluster.yaml\s+RayCluster/flyray", out)
    assert re.search(r"ok\s+clickstream.ingest_clickstream\s+RayJob/", out)
    assert "all valid" in out and "FAIL" not in out
    assert "cluster-check-" not in out  # the dummy secrets are never printed


def test_the_bucket_job_scopes_its_user_to_the_bucket_and_hides_no_error(manifests):
    """MinIO's bucket job: the user's policy names only the bucket (not MinIO's readwrite on
    everything), no failure is swallowed, and the root password is on no command line."""
    [job] = [
        d for d in manifests if d["kind"] == "Job" and d["metadata"]["name"] == "minio-buckets"
    ]
    [container] = job["spec"]["template"]["spec"]["containers"]
    script = container["args"][0]
    assert "|| true" not in script and "readwrite" not in script
    assert container["command"] == ["/bin/sh", "-ec"]  # -e: any failing step fails the job
    assert '"arn:aws:s3:::$BUCKET", "arn:aws:s3:::$BUCKET/*"' in script
    # MLflow's own user: the bucket's mlflow/ prefix only, and MLflow takes its keys, not the
    # tasks' bucket-wide ones
    assert '"Resource": ["arn:aws:s3:::$BUCKET/mlflow/*"]' in script
    assert 'attach store flyray-mlflow --user "$MLFLOW_S3_KEY"' in script
    [mlflow] = [
        d for d in manifests if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"
    ]
    refs = [
        r["secretRef"]["name"]
        for r in mlflow["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    ]
    assert "mlflow-s3" in refs and "flyray-s3" not in refs
    [root] = [line for line in script.splitlines() if "MINIO_ROOT_PASSWORD" in line]
    assert root.startswith("export MC_HOST_store=")  # an environment variable, not an argument


def test_the_bucket_job_puts_no_secret_on_a_command_line(manifests, tmp_path):
    """The job's script run as the Job runs it (`/bin/sh -ec`), with an `mc` on PATH that records
    every command line and what it reads on stdin: no secret is ever an argument, and each user
    gets its secret key through stdin."""
    [job] = [
        d for d in manifests if d["kind"] == "Job" and d["metadata"]["name"] == "minio-buckets"
    ]
    [container] = job["spec"]["template"]["spec"]["containers"]
    log = tmp_path / "mc.log"
    mc = tmp_path / "bin" / "mc"
    mc.parent.mkdir()
    mc.write_text(f"""#!/bin/sh
echo "argv: $*" >> {log}
case "$*" in "admin user add "*) read -r secret; echo "stdin: $secret" >> {log};; esac
""")
    mc.chmod(0o755)
    secrets = {"MINIO_ROOT_PASSWORD": "root-pw-1", "AWS_SECRET_ACCESS_KEY": "task-secret-2",
               "MLFLOW_S3_SECRET": "mlflow-secret-3"}  # fmt: skip
    env = {"PATH": f"{mc.parent}:/usr/bin:/bin", "MINIO_ROOT_USER": "root", "BUCKET": "flyray",
           "AWS_ACCESS_KEY_ID": "task", "MLFLOW_S3_KEY": "mlflow", **secrets}  # fmt: skip
    subprocess.run([*container["command"], container["args"][0]], env=env, check=True, timeout=60)
    lines = log.read_text().splitlines()
    argv = [line for line in lines if line.startswith("argv: ")]
    assert any("admin policy attach store flyray-mlflow --user mlflow" in a for a in argv)
    for secret in secrets.values():
        assert not any(secret in a for a in argv), secret
    assert "stdin: task-secret-2" in lines and "stdin: mlflow-secret-3" in lines
