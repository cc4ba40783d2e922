"""The cluster rehearsal (k8s/rehearse, `make rehearse`) and the defects it found, each with a
regression test that needs no namespace: MLflow refused its own Service name (Host-header check,
MLflow >= 3.5), and its Postgres URI named a driver the image did not install."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, _free_port, serve

import images
from k8s import render
from k8s.rehearse.pods import Process, leftovers, namespace_unavailable, session_pids, stop_all
from tests import background

SECRETS = {name: f"dummy-{name.lower()}" for name in render.SECRETS}


def _mlflow_container() -> dict:
    docs = render.render([REPO / "k8s" / "mlflow.yaml"], env=SECRETS)
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _allowed_hosts() -> str:
    [item] = [e for e in _mlflow_container()["env"] if e["name"] == "ALLOWED_HOSTS"]
    return item["value"]


def _service_names(name: str = "mlflow", namespace: str = "flyray") -> list[str]:
    return [
        name,
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}.svc.cluster.local",
    ]


def test_mlflow_allows_every_service_name_and_no_wildcard():
    allowed = _allowed_hosts().split(",")
    assert "*" not in allowed and not any("*" in a for a in allowed)
    assert {f"{n}:5000" for n in _service_names()} <= set(allowed)
    # what the tasks' ConfigMap gives every client is among them
    assert '--allowed-hosts "$ALLOWED_HOSTS"' in " ".join(_mlflow_container()["args"])


@pytest.mark.e2e
def test_mlflow_with_the_manifests_hosts_answers_its_service_name(tmp_path):
    """A real `mlflow server` with the manifest's --allowed-hosts: requests that reach it as the
    cluster does (Host: the Service's name) get 200, a foreign Host header 403."""
    allowed = _allowed_hosts()
    port = _free_port()
    proc = serve(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'db.sqlite'}",
            "--workers",
            "1",
            "--allowed-hosts",
            allowed,
        ],
        port,
        f"http://127.0.0.1:{port}/health",
    )
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"

        def status(host: str) -> int:
            request = urllib.request.Request(url, headers={"Host": host})
            try:
                return urllib.request.urlopen(request, timeout=10).status
            except urllib.error.HTTPError as err:
                return err.code

        for name in _service_names():
            assert status(f"{name}:5000") == 200, name
        assert status("attacker.example:5000") == 403
    finally:
        background.stop_group(proc)


def test_mlflow_backend_uri_names_a_driver_the_image_installs():
    """The backend store URI names its SQLAlchemy driver, and that driver is installed both in
    images.mlflow_server and here (the rehearsal runs the manifest's command)."""
    args = " ".join(_mlflow_container()["args"])
    uri = re.search(r"--backend-store-uri (\S+)", args).group(1)
    scheme = uri.split("://")[0]
    assert scheme == "postgresql+psycopg", uri
    assert "psycopg-binary==" in Path(images.mlflow_server.requirements).read_text()
    assert importlib.util.find_spec("psycopg") is not None


def test_deleting_a_pod_ends_every_process_it_started(tmp_path):
    """A pod's process in a process group of its own (as Ray's workers are, and the HAProxy a
    Serve proxy starts, which outlived the rehearsal) ends with the pod, as the processes of
    a deleted container do."""
    script = ("import pathlib, subprocess; p = subprocess.Popen(['sleep', '300'], process_group=0)"
              "; pathlib.Path('child').write_text(str(p.pid)); p.wait()")  # fmt: skip
    env = {"PATH": "/usr/bin:/bin"}
    pod = Process("pod", [sys.executable, "-c", script], env, tmp_path, tmp_path / "log").start()
    child = tmp_path / "child"
    for _ in range(100):
        if child.exists() and child.read_text().strip():
            break
        time.sleep(0.05)
    pid = int(child.read_text())
    assert os.getpgid(pid) != pod.proc.pid and os.getsid(pid) == pod.proc.pid
    stop_all([pod], timeout=5)
    assert session_pids(pod.proc.pid) == []
    assert pod not in leftovers(wait_s=0)
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped


@pytest.mark.e2e
@pytest.mark.background("rehearsal")
@pytest.mark.timeout(3000)
def test_rehearsal():
    """`make rehearse`: the platform from its manifests and the packaged recommendation
    workflow, every Ray task a RayJob on a Ray cluster of its own, ending with a version
    registered and promoted in the Postgres-backed MLflow, reached by its Service name, and
    served by the RayService; the training node of every other workload; the faults (a Flyte
    retry of the FunkSVD trainer resumes from its checkpoint on S3; `--all-trainer-faults`
    does that for every trainer)."""
    reason = namespace_unavailable()
    if reason:
        pytest.skip(f"the rehearsal needs a network namespace: {reason}")
    run = background.result("rehearsal")  # started with the session, beside the other tests
    out = run.stdout
    print(out[-6000:])
    assert run.code == 0, out[-4000:] + run.stderr[-4000:]
    check_table(out[out.index("\nnode ") :])


def check_table(table: str) -> None:
    """What the rehearsal's summary table must say."""
    ray_nodes = [
        "ingest_clickstream",
        "build_ratings",
        "tune_params",
        "fit_recommender",
    ]
    for name in ray_nodes:
        line = _node_row(table, name)
        assert "Ray job on" in line and "succeeded" in line, line
    # evaluation and top-N rank in one process (compiled kernels), so no Ray cluster is started
    processes = ["pipeline_recipe", "resolve_source", "data_window", "train_recommender",
                 "evaluate_model", "register_model", "recommend_users"]  # fmt: skip
    for name in processes:
        line = _node_row(table, name)
        assert "process" in line and "succeeded" in line, line
    assert "champion -> version 1" in table
    # the faults: the FunkSVD trainer's pods lost at its first checkpoint on S3, Flyte's next
    # attempt resumed from that checkpoint and trained to the end (every trainer's, with
    # --all-trainer-faults: `make rehearse ARGS=--all-trainer-faults`)
    lost = {
        trainer: row
        for row in table.splitlines()
        for trainer in re.findall(r"^fault: worker \+ head of (\w+) killed", row)
    }
    assert set(lost) == {"fit_recommender"}, lost
    for row in lost.values():
        resumed = re.search(r"attempt [1-9] resumed from \w+ (\d+), trained to \w+ (\d+)", row)
        assert resumed and 0 < int(resumed.group(1)) < int(resumed.group(2)), row
    # the registration outlived an MLflow restart; a Postgres restart lost nothing
    [restart] = [row for row in table.splitlines() if "fault: MLflow restarted" in row]
    assert "succeeded" in restart, restart
    [pg] = [row for row in table.splitlines() if "fault: Postgres restarted" in row]
    assert "nothing lost" in pg and "champion -> version 1" in pg, pg
    # MLflow authenticates every client (flyray/registry_auth.py): the pipeline registered and
    # only the gate moved the alias (champion -> version 1 above); each identity asked by name
    identities = {
        row.split(":", 1)[0]: row
        for row in table.splitlines()
        if row.startswith(("anonymous:", "flyray-")) and "MLflow as" in row
    }
    assert set(identities) == {"anonymous", "flyray-people", "flyray-pipeline", "flyray-gate",
                               "flyray-serving"}  # fmt: skip
    refusals = [r for r in table.splitlines() if "MLflow as" in r and "refused (" in r]
    assert len(refusals) == 11, refusals
    assert any("pipeline: move flyray-funksvd's alias" in r and "403" in r for r in refusals)
    assert any("pipeline: take the gate's lock" in r and "403" in r for r in refusals)
    [lock] = [r for r in table.splitlines() if r.startswith("flyray-gate: take and release")]
    assert lock.rstrip().endswith("allowed"), lock
    assert any("serving: register a version" in r for r in refusals)
    assert any(r.startswith("anonymous:") and "401" in r for r in refusals)
    # the RayService serves the champion through its Service name; its dashboard wants the token
    [service] = [row for row in table.splitlines() if row.startswith("rayservice flyray-serve")]
    assert "4 applications RUNNING" in service, service
    [recommend] = [row for row in table.splitlines() if row.startswith("recommend via")]
    assert "200: [5, 5] items for 2 users from version 1" in recommend, recommend
    [unpromoted] = [row for row in table.splitlines() if row.startswith("flyray-xgboost via")]
    assert " 503 (" in unpromoted, unpromoted
    [dashboard] = [row for row in table.splitlines() if row.startswith("Ray dashboard without")]
    assert "(refused)" in dashboard, dashboard
    # the training node of every other workload, as its RayJob, after the nodes it needs; the
    # CLIP model comes from S3, where resolve_images put the demo model
    for name in ["fit_xgboost", "fit_cnn", "embed_images", "fit_clip_classifier"]:
        line = _node_row(table, name)
        assert "Ray job on" in line and "succeeded" in line, line
    for name in ["resolve_table", "train_xgboost", "train_distributed", "resolve_images"]:
        assert "succeeded" in _node_row(table, name)
    [deleted] = [row for row in table.splitlines() if row.startswith("pods deleted")]
    assert re.search(r"no process left by \d+ pods$", deleted), deleted
    [clip] = [row for row in table.splitlines() if row.startswith("clip model ")]
    assert re.search(r" s3://flyray/raw/\S+/demo/tiny-clip$", clip), clip


def _node_row(table: str, task: str) -> str:
    """The summary row of the node that ran `task` (rows of nodes start with the node's id)."""
    [line] = [row for row in table.splitlines() if re.match(rf"n[\w-]* {task} ", row)]
    return line
