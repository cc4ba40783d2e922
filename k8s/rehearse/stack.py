"""The platform namespace of k8s/ (Postgres, MinIO, MLflow), each started from its rendered
manifest: the container's command, args and environment, its Service's name and port, its
readiness probe. What stands in for an image is said where it happens:
- Postgres: Debian's `postgresql` server (the manifest's image is postgres:16.4), initialised as
  the image's entrypoint initialises it (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, then the
  init ConfigMap's SQL), run as the `postgres` user, listening on its Service address only.
- MinIO: moto's S3 server on MinIO's Service name and port, the buckets of the minio-buckets Job
  created with MinIO's root credentials (moto checks no credentials; issue #27 adds identities).
- MLflow: the manifest's own command (`python -m flyray.registry_auth`, then `mlflow server
  --app-name flyray-auth ...`), from this venv (images.mlflow_server installs the same mlflow and
  flyray); its /tmp (an emptyDir on a cluster) is its folder's tmp/. The rehearsal's own reads go
  out as the people identity (Secret flyray-mlflow-people), as a person's would.
"""

from __future__ import annotations

import base64
import glob
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from flyray.registry import Credentials, acting_as
from k8s.rehearse.pods import (
    IMAGE_PATH,
    Hosts,
    Objects,
    Process,
    RehearsalError,
    declares_read_only_root,
    http,
    wait_for,
)

NAMESPACE = "flyray"


def _container(deployment: dict) -> dict:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _port(objects: Objects, service: str, name: str) -> int:
    svc = objects.find("Service", NAMESPACE, service)
    [port] = [p for p in svc["spec"]["ports"] if p["name"] == name]
    return int(port["port"])


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise RehearsalError("PostgreSQL is not installed (apt-get install postgresql)")
    return Path(found[-1]).parent


def install_postgres() -> str:
    """Debian's postgresql package, installed when absent (the rehearsal runs as root);
    returns what was done."""
    if glob.glob("/usr/lib/postgresql/*/bin/postgres"):
        return "installed"
    if not shutil.which("apt-get"):
        raise RehearsalError("PostgreSQL is not installed and there is no apt-get to install it")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        done = subprocess.run(step, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RehearsalError(f"{' '.join(step)} failed: {done.stderr.strip()[-500:]}")
    return "installed now (apt-get install postgresql)"


class Postgres:
    """The postgres Deployment: data kept in `root` across restarts (its PersistentVolume)."""

    def __init__(self, objects: Objects, hosts: Hosts, root: Path):
        self.objects, self.root = objects, root
        self.container = _container(objects.find("Deployment", NAMESPACE, "postgres"))
        self.env = objects.env(self.container, NAMESPACE)
        self.port = _port(objects, "postgres", "postgres")
        self.address = hosts.service("postgres", NAMESPACE)
        self.data = root / "data"
        self.process: Process | None = None

    def _initdb(self) -> None:
        """What the image's entrypoint does on an empty volume."""
        user, password = self.env["POSTGRES_USER"], self.env["POSTGRES_PASSWORD"]
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root, "postgres", "postgres")
        secret = self.root / "pwfile"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        shutil.chown(secret, "postgres", "postgres")
        try:
            subprocess.run(
                [
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    str(postgres_bin() / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    user,
                    f"--pwfile={secret}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=scram-sha-256",
                ],
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as err:
            raise RehearsalError(f"initdb failed: {err.stderr[-2000:]}") from None
        finally:
            secret.unlink()

    def start(self) -> None:
        fresh = not self.data.exists()
        if fresh:
            self._initdb()
        sockets = self.root / "run"
        sockets.mkdir(exist_ok=True)
        shutil.chown(sockets, "postgres", "postgres")
        argv = [
            str(postgres_bin() / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={self.address}",
            "-k",
            str(sockets),
        ]
        self.process = Process(
            "postgres",
            argv,
            {"PATH": IMAGE_PATH, "LANG": "C.UTF-8"},
            self.root,
            self.root / "postgres.log",
            user="postgres",
            read_only=declares_read_only_root(self.container),
        ).start()
        # The Deployment's readinessProbe: pg_isready -U flyray -d mlflow (its database exists
        # only after initialisation, so before that the server itself is probed).
        wait_for("postgres", self._ready, process=self.process)
        if fresh:
            self._initialise()

    def _ready(self) -> bool:
        probe = subprocess.run(
            [str(postgres_bin() / "pg_isready"), "-h", self.address, "-p", str(self.port)],
            capture_output=True,
        )
        return probe.returncode == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as POSTGRES_USER over TCP, the password through libpq's PGPASSWORD."""
        env = {"PATH": IMAGE_PATH, "PGPASSWORD": self.env["POSTGRES_PASSWORD"]}
        out = subprocess.run(
            [
                str(postgres_bin() / "psql"),
                "-h",
                self.address,
                "-p",
                str(self.port),
                "-U",
                self.env["POSTGRES_USER"],
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise RehearsalError(f"psql: {out.stderr.strip()}")
        return out.stdout

    def _initialise(self) -> None:
        self.psql(f'CREATE DATABASE "{self.env["POSTGRES_DB"]}"')
        init = self.objects.find("ConfigMap", NAMESPACE, "postgres-init")
        for name, sql in sorted(init["data"].items()):
            if name.endswith(".sql"):
                self.psql(sql, database=self.env["POSTGRES_DB"])

    def restart(self) -> None:
        """A pod restart: the server stops (fast shutdown, as on SIGTERM) and starts again on the
        same volume."""
        self.process.stop(signal.SIGTERM)
        self.start()

    def stop(self) -> None:
        if self.process:
            self.process.stop(signal.SIGTERM)


class MinIO:
    """S3 at MinIO's Service name and port, with the buckets the minio-buckets Job creates."""

    def __init__(self, objects: Objects, hosts: Hosts, root: Path):
        self.objects, self.root = objects, root
        self.port = _port(objects, "minio", "api")
        self.address = hosts.service("minio", NAMESPACE)
        self.endpoint = f"http://minio.{NAMESPACE}.svc.cluster.local:{self.port}"
        self.process: Process | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "moto.server", "-H", self.address, "-p", str(self.port)]
        self.process = Process(
            "minio", argv, {"PATH": IMAGE_PATH}, self.root, self.root / "minio.log"
        ).start()
        wait_for("minio", lambda: http(self.endpoint)[0] < 500, process=self.process)
        job = self.objects.find("Job", NAMESPACE, "minio-buckets")
        [container] = job["spec"]["template"]["spec"]["containers"]
        env = self.objects.env(container, NAMESPACE)
        root = self.client(env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"])
        root.create_bucket(Bucket=env["BUCKET"])
        self.bucket = env["BUCKET"]

    def client(self, key: str, secret: str):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
        )

    def stop(self) -> None:
        if self.process:
            self.process.stop()


class MLflow:
    """The mlflow Deployment's container: its command and args, its environment."""

    def __init__(self, objects: Objects, hosts: Hosts, root: Path):
        self.objects, self.root = objects, root
        self.container = _container(objects.find("Deployment", NAMESPACE, "mlflow"))
        self.port = _port(objects, "mlflow", "http")
        self.address = hosts.service("mlflow", NAMESPACE)
        self.uri = f"http://mlflow.{NAMESPACE}.svc.cluster.local:{self.port}"
        self.process: Process | None = None
        people = objects.secret(NAMESPACE, "flyray-mlflow-people")
        self.people = Credentials(people["username"], people["password"])

    def passwords(self) -> dict[str, str]:
        """Every identity's password, as the server's Secret holds them."""
        from flyray.registry_auth import IDENTITIES

        held = self.objects.secret(NAMESPACE, "mlflow-auth")
        return {name: held[variable] for name, (variable, _) in IDENTITIES.items()}

    def start(self) -> None:
        env = {"PATH": IMAGE_PATH, **self.objects.env(self.container, NAMESPACE)}
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env = {k: str(tmp) + v[4:] if v == "/tmp" or v.startswith("/tmp/") else v
               for k, v in env.items()}  # fmt: skip
        argv = [*self.container["command"], *self.container["args"]]
        read_only = declares_read_only_root(self.container)
        self.process = Process(
            "mlflow", argv, env, self.root, self.root / "mlflow.log", read_only=read_only
        ).start()
        probe = self.container["readinessProbe"]["httpGet"]["path"]
        startup = self.container.get("startupProbe") or {}  # the time it is given to start
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        wait_for("mlflow", lambda: http(self.uri + probe)[0] == 200, budget, self.process)

    def check_api(self) -> None:
        """What every client does first, by the Service name the ConfigMap gives them (the
        readiness probe's /health is not behind the Host-header check: it cannot see this)."""
        answers: list[tuple[int, str]] = []
        url = f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1"
        auth = base64.b64encode(f"{self.people.username}:{self.people.password}".encode())
        headers = {"Authorization": f"Basic {auth.decode()}"}
        # A fresh server's first request may be slow on a loaded machine: a time-out is "not
        # ready yet", any answer is the answer.
        wait_for(
            "mlflow API",
            lambda: answers.append(http(url, headers=headers, timeout=30)) or True,
            process=self.process,
        )
        status, body = answers[-1]
        if status != 200:
            raise RehearsalError(
                f"MLflow's API refuses its own Service name {self.uri} "
                f"({status}: {body.strip()[:200]})"
            )

    def registry(self, model: str) -> str:
        """The registered model's versions and aliases, as a client reads them."""
        from mlflow import MlflowClient

        with acting_as(self.people):
            return self._registry(MlflowClient(self.uri), model)

    def _registry(self, client, model: str) -> str:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{model}'"))
        if not versions:
            raise RehearsalError(f"no version of {model} registered in {self.uri}")
        aliases = client.get_registered_model(model).aliases
        named = ", ".join(f"{a} -> version {v}" for a, v in sorted(aliases.items()))
        if not named:  # the gate's reason, as the version's tag holds it
            tags = client.get_model_version(model, str(versions[-1])).tags
            named = f"no alias ({tags.get('promotion_reason', 'no reason recorded')})"
        return f"versions {versions}, {named}"

    def restart(self) -> None:
        self.process.stop(signal.SIGTERM)
        self.start()

    def stop(self) -> None:
        if self.process:
            self.process.stop()
