"""Lineage of a registered version (flyray.lineage): the code version of a checkout, clean and
dirty, and what a registration records on the run and on the version, against a real MLflow."""

from __future__ import annotations

import subprocess

import mlflow
from test_registry_auth import candidate

from flyray import registry
from flyray.lineage import DIRTY, DataInput, Lineage, code_version


def test_code_version_names_the_commit_and_uncommitted_changes(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert code_version(tmp_path) == ""  # not a checkout: nothing claimed
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert code_version(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("not code\n")
    assert code_version(tmp_path) == head  # untracked files do not change the code
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == head + DIRTY


def test_a_registration_records_its_lineage_on_the_run_and_the_version(
    mlflow_server, small_funksvd, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    config = registry.RegistryConfig("lineage-model", "lineage-tests", "ndcg@10")
    data = DataInput("clickstream", "s3://bucket/clicks/", "ab" * 32, "[2024-01-01, 2024-01-31)")
    lineage = Lineage("flyray/development/f123", "c0ffee" * 6 + "abcd" + DIRTY,
                      "registry/flyray-recommender:abc", "cd" * 32, (data,))  # fmt: skip
    done = registry.register(config, candidate(small_funksvd, 0.3), lineage=lineage)
    client = mlflow.MlflowClient(mlflow_server)
    version = client.get_model_version("lineage-model", done.decision.version).tags
    run = client.get_run(done.run_id)
    for tags in (version, run.data.tags, done.lineage):
        assert tags["lineage.commit"] == "c0ffee" * 6 + "abcd"
        assert tags["lineage.dirty"] == "true"
        assert tags["lineage.image"] == "registry/flyray-recommender:abc"
        assert tags["lineage.data.clickstream"] == "s3://bucket/clicks/ sha256:" + "ab" * 32
        assert tags["lineage.window.clickstream"] == "[2024-01-01, 2024-01-31)"
        assert tags["lineage.execution"] == "flyray/development/f123"
    [used] = run.inputs.dataset_inputs
    assert (used.dataset.name, used.dataset.digest) == ("clickstream", "ab" * 16)
    assert "s3://bucket/clicks/" in used.dataset.source
    assert {t.key: t.value for t in used.tags}["window"] == "[2024-01-01, 2024-01-31)"
    assert "Lineage" in "".join(done.deck())
