"""Secret hygiene: the main job runs with known credentials (S3 keys as Flyte secrets, MLflow
credentials from the environment) and none of them shows up in any log line, deck, output,
MLflow param, tag, metric name or artifact, nor in the MLflow server's own files."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import mlflow
import pytest

from flyray.clickstream.generate import GeneratorConfig, generate
from tests.conftest import REPO

SECRETS = {
    "s3_key_id": "AKIAFLYRAYSENTINEL7Q",
    "s3_secret": "s3-secret-sentinel-9d1c2a7e",
    "mlflow_password": "mlflow-password-sentinel-5b3f",
}


def _forms(secret: str) -> list[bytes]:
    raw = secret.encode()
    return [raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw)]


def _leaks(root: Path) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {name}" for name, s in SECRETS.items()
                      if any(f in data for f in _forms(s))]  # fmt: skip
    return found


@pytest.mark.e2e
def test_no_secret_reaches_logs_decks_outputs_or_mlflow(
    tmp_path, s3_server, mlflow_server, mlflow_root, monkeypatch
):
    events = tmp_path / "events.jsonl"
    generate(events, GeneratorConfig(n_events=20_000, seed=5))
    s3 = boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1",
        aws_access_key_id=SECRETS["s3_key_id"], aws_secret_access_key=SECRETS["s3_secret"],
    )  # fmt: skip
    s3.create_bucket(Bucket="secret-test")
    s3.upload_file(str(events), "secret-test", "clicks/events.jsonl")

    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update({
        "FLYRAY_DATA_DIR": str(work / "data"),
        "TMPDIR": str(work),
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "FLYRAY_S3_ENDPOINT_URL": s3_server,
        "AWS_REGION": "us-east-1",
        # S3 keys as the Flyte secrets mount them (tasks request them with env_var=...).
        "FLYRAY_S3_SECRET_GROUP": "s3creds",
        "AWS_ACCESS_KEY_ID": SECRETS["s3_key_id"],
        "AWS_SECRET_ACCESS_KEY": SECRETS["s3_secret"],
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MLFLOW_TRACKING_USERNAME": "flyray",
        "MLFLOW_TRACKING_PASSWORD": SECRETS["mlflow_password"],
        "FLYTE_SDK_LOGGING_LEVEL": "10",  # flytekit at DEBUG: the most it would ever print
    })  # fmt: skip
    params = '{"n_factors": 8, "n_epochs": 3, "negatives": 2, "rating_min": 0.0}'
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "flytekit.clis.sdk_in_container.pyflyte", "run",
             "workflows/recommendation.py", "recommendation_pipeline",
             "--source", "s3://secret-test/clicks/", "--params", params,
             "--registration",
             '{"model_name": "secret-check", "experiment": "secret-check", "metric": "ndcg@10"}'],
            capture_output=True, text=True, timeout=900, env=env, cwd=REPO,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs = proc.stdout + proc.stderr
        assert "PipelineOutputs" in proc.stdout
        assert not [n for n, s in SECRETS.items() if s in logs]
        assert list(work.rglob("deck.html")), "the run wrote no decks to check"
        assert not _leaks(work)  # decks, outputs, local cache, embedded files
        assert not _leaks(ray_tmp)  # every Ray log of driver, raylet and workers
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    client = mlflow.MlflowClient(mlflow_server)
    [experiment] = [e for e in client.search_experiments() if e.name == "secret-check"]
    [run] = client.search_runs([experiment.experiment_id])
    texts = [*run.data.params.items(), *run.data.tags.items(), *run.data.metrics]
    versions = client.search_model_versions("name='secret-check'")
    assert [int(v.version) for v in versions] == [1]  # `pyflyte run` registered one version
    for version in versions:
        texts += list(version.tags.items()) + [version.source or ""]
    # lineage (flyray.lineage): tags and MLflow dataset inputs, names and digests only
    texts += [
        (d.dataset.name, d.dataset.source, d.dataset.digest) for d in run.inputs.dataset_inputs
    ]
    flat = repr(texts)
    assert "model.n_factors" in flat  # the params were read
    assert "lineage.data.clickstream" in flat and "s3://secret-test/clicks/" in flat
    assert not [n for n, s in SECRETS.items() if s in flat]
    artifacts = tmp_path / "artifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # models:/ URIs resolve through it
    mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, dst_path=str(artifacts / "run"), tracking_uri=mlflow_server
    )
    for version in client.search_model_versions("name='secret-check'"):  # MLflow 3 logged models
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/secret-check/{version.version}",
            dst_path=str(artifacts / version.version), tracking_uri=mlflow_server,
        )  # fmt: skip
    assert list(artifacts.rglob("*.npz")), "no model artifact downloaded"
    assert (artifacts / "run" / "lineage" / "recipe.json").exists()  # the workflow's inputs
    assert not _leaks(artifacts)
    assert not _leaks(mlflow_root)  # the server's database and artifact store
