"""Registration against a real `mlflow server` on loopback: pyfunc round trip, champion gate."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import mlflow
import pytest
from test_funksvd import synthetic

from flyray import registry
from flyray.recsys import FunkSVD
from flyray.recsys.pyfunc import log_pyfunc


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    registry.use_experiment("registry-tests")
    return mlflow_server


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    model = FunkSVD(n_factors=4, n_epochs=3).fit(synthetic(n=3_000))
    folder = str(tmp_path_factory.mktemp("model") / "funksvd")
    model.save(folder)
    return model, folder


def _register(name, value, small_model):
    model, folder = small_model
    with mlflow.start_run():
        mlflow.log_metric("ndcg_at_10", value)
        info = log_pyfunc(model, folder, registered_name=name)
    return str(info.registered_model_version)


def test_pyfunc_answers_in_a_fresh_process(tracking, small_model):
    model, _ = small_model
    version = _register("pyfunc-check", 0.1, small_model)
    users = model.user_ids[:2].tolist()
    code = (
        "import mlflow, pandas as pd, json; "
        f"m = mlflow.pyfunc.load_model('models:/pyfunc-check/{version}'); "
        f"top = m.predict(pd.DataFrame({{'user_id': {users}}}), params={{'n': 5}}); "
        f"pair = m.predict(pd.DataFrame({{'user_id': [{users[0]}], 'item_id': [{int(model.item_ids[0])}]}})); "
        "print(json.dumps({'top': top.item_id.tolist(), 'score': float(pair.score[0])}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "MLFLOW_TRACKING_URI": tracking}, check=True,
    )  # fmt: skip
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["top"] == model.recommend(users, n=5).item_id.tolist()
    want = model.predict([users[0]], [int(model.item_ids[0])])[0]
    assert answer["score"] == pytest.approx(float(want), rel=1e-5)


def test_gate_promotes_better_and_refuses_worse(tracking, small_model):
    name = "gate-check"
    client = mlflow.MlflowClient(tracking)
    v1 = _register(name, 0.10, small_model)
    first = registry.champion_gate(name, v1, "ndcg@10", 0.10, baseline_value=0.05)
    assert first.promoted and "no champion yet" in first.reason
    v2 = _register(name, 0.08, small_model)
    worse = registry.champion_gate(name, v2, "ndcg@10", 0.08, baseline_value=0.05)
    assert not worse.promoted and f"champion v{v1}" in worse.reason
    assert client.get_model_version_by_alias(name, "champion").version == v1
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion"] == "rejected" and "does not beat champion" in tags["promotion_reason"]
    v3 = _register(name, 0.20, small_model)
    better = registry.champion_gate(name, v3, "ndcg@10", 0.20, baseline_value=0.05)
    assert better.promoted and better.champion_version == v1
    assert client.get_model_version_by_alias(name, "champion").version == v3
    v4 = _register(name, 0.30, small_model)
    below_baseline = registry.champion_gate(name, v4, "ndcg@10", 0.30, baseline_value=0.35)
    assert not below_baseline.promoted and "baseline" in below_baseline.reason
    assert client.get_model_version_by_alias(name, "champion").version == v3


def test_embedded_store_lives_in_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FLYRAY_DATA_DIR", str(tmp_path))
    assert registry.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    registry.use_experiment("embedded")
    with mlflow.start_run():
        mlflow.log_dict({"a": 1}, "x.json")
    assert list((tmp_path / "mlflow" / "artifacts").rglob("x.json"))


def _race(name: str, values: tuple[float, float], small_model) -> dict:
    """Two pipelines register and run their gates at the same moment."""
    barrier = threading.Barrier(2)
    decisions: dict = {}

    def pipeline(value: float) -> None:
        version = _register(name, value, small_model)
        barrier.wait()
        decisions[value] = registry.champion_gate(
            name, version, "ndcg@10", value, baseline_value=0.1
        )

    threads = [threading.Thread(target=pipeline, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return decisions


def test_concurrent_registrations_end_with_the_better_champion(tracking, small_model):
    """Both versions exist and the better one holds the alias, whichever gate wrote last."""
    client = mlflow.MlflowClient(tracking)
    for attempt, values in enumerate([(0.30, 0.40), (0.40, 0.30)] * 2):
        name = f"race-{attempt}"
        decisions = _race(name, values, small_model)
        versions = {v.version for v in client.search_model_versions(f"name='{name}'")}
        assert versions == {decisions[0.30].version, decisions[0.40].version}
        champion = client.get_model_version_by_alias(name, "champion").version
        assert champion == decisions[0.40].version, attempt
        assert decisions[0.40].promoted and not decisions[0.30].promoted
        tags = client.get_model_version(name, decisions[0.30].version).tags
        assert tags["promotion"] == "rejected"
