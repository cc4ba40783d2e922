"""MLflow with flyray's identities (flyray/registry_auth.py) against a real `mlflow server
--app-name flyray-auth`: anonymous requests refused, serving read-only, the pipeline registers but
only the gate moves the alias, and the one registration path works through it as on a cluster."""

from __future__ import annotations

import os

import mlflow
import pytest

from flyray import registry
from flyray.recsys.pyfunc import log_pyfunc
from flyray.registry_auth import GATE, PIPELINE, _rules
from k8s.rehearse.identities import check, table


def candidate(small_funksvd, value: float) -> registry.Candidate:
    """A registry candidate of the tiny FunkSVD, with `value` as its gate figure."""
    model, folder = small_funksvd
    identity = registry.TaskIdentity("recommendation", "top-k", "clickstream events", "ndcg@10")
    record = registry.RunRecord(params={"k": 10}, metrics={"ndcg_at_10": value})
    return registry.Candidate(
        identity, record, lambda name: log_pyfunc(model, folder, registered_name=name),
        value, 0.01, lambda uri: value / 2,
    )  # fmt: skip


def test_the_rule_covers_every_route_of_an_alias_move():
    """MLflow serves each request at /api and /ajax-api: the rule reads MLflow's own endpoint
    table, so neither path of either method escapes it."""
    table_ = _rules()
    for prefix in ("/api/2.0/mlflow", "/ajax-api/2.0/mlflow"):
        for method in ("POST", "DELETE"):
            what, allowed, _ = table_[(f"{prefix}/registered-models/alias", method)]
            assert (what, allowed) == ("move an alias", frozenset({GATE}))
        assert table_[(f"{prefix}/registered-models/create", "POST")][1] == {PIPELINE}


def test_only_the_gate_promotes_and_each_identity_gets_what_it_needs(
    mlflow_auth_server, small_funksvd, monkeypatch
):
    uri, passwords = mlflow_auth_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # The task pod's own identity is the pipeline's (the flyray-mlflow-pipeline Secret).
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", PIPELINE)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", passwords[PIPELINE])
    config = registry.RegistryConfig("auth-model", "auth-tests", "ndcg@10")
    gate = registry.Credentials(GATE, passwords[GATE])

    first = registry.register(config, candidate(small_funksvd, 0.30), gate=gate)
    assert first.decision.promoted, first.decision.reason
    client = mlflow.MlflowClient(uri)
    assert client.get_model_version_by_alias("auth-model", "champion").version == "1"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == PIPELINE  # restored after the gate

    # Without the gate's identity the pipeline cannot promote its own model: the version stays
    # registered, the champion stays, and the refusal says who may.
    with pytest.raises(mlflow.exceptions.MlflowException, match="only flyray-gate may"):
        registry.register(config, candidate(small_funksvd, 0.50), gate=None)
    versions = {v.version for v in client.search_model_versions("name='auth-model'")}
    assert versions == {"1", "2"}
    assert client.get_model_version_by_alias("auth-model", "champion").version == "1"

    checks = check(uri, passwords, "auth-model")
    print(table(checks))
    assert all(c.passed for c in checks), table(checks)
    assert {c.identity for c in checks} == {"anonymous", *passwords}
    refused = [c for c in checks if c.expected == "refused"]
    assert all(c.outcome.startswith(("refused (401", "refused (403")) for c in refused)

    # A second turn of the gate on the same model: its lock, created and deleted again (the
    # deletion sweeps the creator's grant with it, so the name is free for the next turn).
    again = registry.register(config, candidate(small_funksvd, 0.50), gate=gate)
    assert again.decision.promoted and again.decision.champion_version == "1", again.decision
    holder = client.get_model_version_by_alias("auth-model", "champion").version
    assert holder == again.decision.version == "3"
