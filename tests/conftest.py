"""Shared fixtures and the suite's tiers.

Tiers, run in this order (`make test` runs all, `make test-unit` the first alone):
- unit: no Ray, no server, no subprocess service; most tests. A unit test that starts Ray fails.
- integration: a test that asks for a service fixture: `ray_cluster` (one local Ray for the
  session), `s3_server` / `s3_env` (moto on loopback), `mlflow_server` (a real `mlflow server`),
  `mlflow_auth_server` (one with flyray's identities, as k8s/mlflow.yaml starts it).
- e2e: `@pytest.mark.e2e`: whole pipelines, CLIs in subprocesses, the cluster rehearsal, the
  node-loss scenarios and `make run` (`@pytest.mark.background(job)`: jobs that start with
  the session and run beside the other tests, tests/background.py; their tests come last and
  collect them).
A test's tier is set here from its fixtures and marker, so it cannot be mislabelled.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import ray
from flytekit.core import local_cache

from k8s.rehearse.pods import namespace_unavailable
from tests import background

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A reference file from ../shared/data, or a skip naming it: the samples sit beside the
    checkout for developers and CI, but a bare clone has none."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"{path} is absent (reference samples live in ../shared/data beside the checkout)"
        )
    return path


def rees46_sample() -> Path:
    return shared_data("clickstream", "rees46-2019-oct-sample.csv")


TIERS = ("unit", "integration", "e2e")
SERVICES = {"ray_cluster", "s3_server", "mlflow_server", "mlflow_auth_server"}
_TIER = pytest.StashKey[str]()


def pytest_collection_modifyitems(config, items) -> None:
    """Mark each test with its tier and run the tiers in order (unit tests before anything
    starts Ray, so the guard below sees a unit test that does)."""
    for item in items:
        if item.get_closest_marker("e2e"):
            tier = "e2e"
        elif SERVICES & set(getattr(item, "fixturenames", ())):
            tier = "integration"
        else:
            tier = "unit"
        item.stash[_TIER] = tier
        item.add_marker(getattr(pytest.mark, tier))
    items.sort(key=lambda item: (TIERS.index(item.stash[_TIER]), _job(item) is not None))


def _job(item) -> str | None:
    marker = item.get_closest_marker("background")
    return marker.args[0] if marker else None


def pytest_collection_finish(session) -> None:
    """The selected tests' background jobs start now and run beside the other tests
    (tests/background.py); their tests, the last, collect them."""
    if session.config.option.collectonly:
        return
    jobs = [job for job in map(_job, session.items) if job is not None]
    if "rehearsal" in jobs and namespace_unavailable():
        jobs.remove("rehearsal")  # its test skips, naming why
    background.start(jobs)


def pytest_sessionfinish(session) -> None:
    background.stop()


@pytest.fixture(autouse=True)
def _unit_tests_start_nothing(request):
    """A unit test must not start Ray (library code never does; a Flyte Ray task would)."""
    started_before = ray.is_initialized()
    yield
    if request.node.stash.get(_TIER, "") == "unit" and ray.is_initialized() and not started_before:
        ray.shutdown()
        pytest.fail("this unit test started Ray: ask for the ray_cluster fixture (integration)")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session (2 CPUs); Flyte's Ray plugin reuses it (ignore_reinit)."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # address="local": always a new instance, never another Ray already running on the host.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def serialized() -> dict:
    """Every workflow, launch plan and task as registration serializes them (k8s.check),
    serialized once for the session: what every cluster-path test reads."""
    from k8s import check

    return check.serialize()


@pytest.fixture(scope="session")
def task_templates(serialized) -> Callable[..., dict]:
    """`task_templates("clip")`: the task templates of tasks/clip.py by short name (no
    argument: every task's); a dotted name is a module of its own ("workflows.clip")."""
    from flytekit.models.task import TaskSpec

    def of(*modules: str) -> dict:
        prefixes = tuple(m + "." if "." in m else f"tasks.{m}." for m in modules) or ("tasks.",)
        return {v.template.id.name.split(".")[-1]: v.template for v in serialized.values()
                if isinstance(v, TaskSpec) and v.template.id.name.startswith(prefixes)}  # fmt: skip

    return of


@pytest.fixture(scope="session")
def launch_plans(serialized) -> dict:
    """The serialized launch plans by name."""
    from flytekit.models.launch_plan import LaunchPlan

    return {v.id.name: v for v in serialized.values() if isinstance(v, LaunchPlan)}


@pytest.fixture(autouse=True)
def mlflow_tracking_per_test():
    """MLflow keeps the tracking URI in a process global (set_tracking_uri, called by
    flyray.registry, also exports it), which would outlive the test that set it and send the
    next one's models:/ lookups to its store: each test starts from its own environment."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(None)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(
    command: list[str], port: int, ready_url: str, timeout: float = 300, env: dict | None = None
):
    """Start a server process on loopback (a process group of its own: `mlflow server` runs
    its app in a child) and wait until `ready_url` answers. The deadline is generous: seconds
    on a quiet machine, 90 s seen with the suite's background jobs on 2 slow cores."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(ready_url, timeout=1)
            return proc
        except urllib.error.HTTPError:  # it answers, even if not 200
            return proc
        except OSError:
            time.sleep(0.3)
    background.stop_group(proc)
    raise RuntimeError(f"{command[:4]} did not answer on port {port}")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto in server mode) on loopback, for s3:// paths."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = serve(cmd, port, endpoint)
    yield endpoint
    background.stop_group(proc)


@pytest.fixture(scope="session")
def mlflow_root(tmp_path_factory):
    """Where the test MLflow server keeps its database and artifacts."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="session")
def mlflow_server(mlflow_root):
    """A real `mlflow server` process on loopback (sqlite backend, local artifact store)."""
    root = mlflow_root
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = serve(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        port, f"{uri}/health",
    )  # fmt: skip
    yield uri
    background.stop_group(proc)


@pytest.fixture(scope="session")
def mlflow_auth_server(tmp_path_factory):
    """`mlflow server --app-name flyray-auth` on loopback, started as k8s/mlflow.yaml starts it
    (the identities created first by `python -m flyray.registry_auth`) on sqlite; yields its URI
    and each identity's password."""
    from flyray.registry_auth import IDENTITIES

    root = tmp_path_factory.mktemp("mlflow-auth")
    config = root / "basic_auth.ini"
    config.write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
        "admin_username = admin\nauth_cache_ttl_seconds = 60\n"
    )
    passwords = {name: f"{name}-{os.urandom(8).hex()}" for name in IDENTITIES}
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": os.urandom(12).hex(),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(12).hex(),
        **{variable: passwords[name] for name, (variable, _) in IDENTITIES.items()},
    }
    subprocess.run([sys.executable, "-m", "flyray.registry_auth"], env=env, check=True,
                   capture_output=True)  # fmt: skip
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = serve(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "flyray-auth",
         "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        port, f"{uri}/health", env=env,
    )  # fmt: skip
    yield uri, passwords
    background.stop_group(proc)


@pytest.fixture(scope="session")
def small_funksvd(tmp_path_factory):
    """A tiny trained FunkSVD and the folder it is saved in, for registry tests."""
    from test_funksvd import synthetic

    from flyray.recsys import FunkSVD

    model = FunkSVD(n_factors=4, n_epochs=2).fit(synthetic(n=2_000))
    folder = str(tmp_path_factory.mktemp("model") / "funksvd")
    model.save(folder)
    return model, folder


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Endpoint and credentials from the environment, as a user would configure MinIO."""
    monkeypatch.setenv("FLYRAY_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return s3_server


PINNED_COMMIT = "a" * 40


@pytest.fixture
def pinned_commit(monkeypatch):
    """Lineage records PINNED_COMMIT, clean, and `make reproduce` sees it checked out, whatever
    the checkout's state (the suite may run with uncommitted changes)."""
    from tasks import deployment

    monkeypatch.setenv("FLYRAY_CODE_VERSION", PINNED_COMMIT)
    deployment.current.cache_clear()
    yield PINNED_COMMIT
    monkeypatch.delenv("FLYRAY_CODE_VERSION")
    deployment.current.cache_clear()


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """FLYRAY_DATA_DIR in this test's folder, MLflow on the embedded store there."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FLYRAY_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def flyte_cache(tmp_path, monkeypatch):
    """A fresh local Flyte cache per test: no result leaks between tests or from user runs."""
    monkeypatch.setattr(local_cache, "CACHE_LOCATION", str(tmp_path / "flyte-cache"))
    monkeypatch.setattr(local_cache.LocalTaskCache, "_initialized", False)
    monkeypatch.setenv("FLYTE_LOCAL_CACHE_ENABLED", "true")
    yield
    monkeypatch.setattr(local_cache.LocalTaskCache, "_initialized", False)


def jsonl(*records: str) -> bytes:
    return ("\n".join(records) + "\n").encode()


def event(user=1, item=2, etype="view", ts="2024-01-01T00:00:00Z", session="s1") -> str:
    import json

    return json.dumps(
        {
            "user_id": user,
            "item_id": item,
            "event_type": etype,
            "timestamp": ts,
            "session_id": session,
        }
    )
