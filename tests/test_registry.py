"""Registration against a real `mlflow server` on loopback: pyfunc round trip, champion gate."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import mlflow
import pytest

from flyray import registry
from flyray.recsys.pyfunc import log_pyfunc


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    registry.use_experiment("registry-tests")
    return mlflow_server


def _register(name, value, small_funksvd):
    model, folder = small_funksvd
    with mlflow.start_run():
        mlflow.log_metric("ndcg_at_10", value)
        info = log_pyfunc(model, folder, registered_name=name)
    return str(info.registered_model_version)


def test_pyfunc_answers_in_a_fresh_process(tracking, small_funksvd):
    model, _ = small_funksvd
    version = _register("pyfunc-check", 0.1, small_funksvd)
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
    want = model.score([users[0]], [int(model.item_ids[0])])[0]
    assert answer["score"] == pytest.approx(float(want), rel=1e-5)


def test_gate_promotes_better_and_refuses_worse(tracking, small_funksvd):
    name = "gate-check"
    client = mlflow.MlflowClient(tracking)
    v1 = _register(name, 0.10, small_funksvd)
    first = registry.champion_gate(name, v1, "ndcg@10", 0.10, baseline_value=0.05)
    assert first.promoted and "no champion yet" in first.reason
    v2 = _register(name, 0.08, small_funksvd)
    worse = registry.champion_gate(name, v2, "ndcg@10", 0.08, baseline_value=0.05)
    assert not worse.promoted and f"champion v{v1}" in worse.reason
    assert client.get_model_version_by_alias(name, "champion").version == v1
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion"] == "rejected" and "does not beat champion" in tags["promotion_reason"]
    v3 = _register(name, 0.20, small_funksvd)
    better = registry.champion_gate(name, v3, "ndcg@10", 0.20, baseline_value=0.05)
    assert better.promoted and better.champion_version == v1
    assert client.get_model_version_by_alias(name, "champion").version == v3
    v4 = _register(name, 0.30, small_funksvd)
    below_baseline = registry.champion_gate(name, v4, "ndcg@10", 0.30, baseline_value=0.35)
    assert not below_baseline.promoted and "baseline" in below_baseline.reason
    assert client.get_model_version_by_alias(name, "champion").version == v3


def test_embedded_store_lives_in_the_data_dir(data_dir):
    assert registry.tracking_uri() == f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}"
    registry.use_experiment("embedded")
    with mlflow.start_run():
        mlflow.log_dict({"a": 1}, "x.json")
    assert list((data_dir / "mlflow" / "artifacts").rglob("x.json"))


def _race(name: str, values: tuple[float, ...], small_funksvd) -> dict:
    """Pipelines register, then run their gates at the same moment."""
    barrier = threading.Barrier(len(values))
    decisions: dict = {}

    def pipeline(value: float) -> None:
        version = _register(name, value, small_funksvd)
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


@pytest.mark.e2e
def test_concurrent_gates_take_turns_and_the_best_ends_champion(tracking, small_funksvd):
    """Four gates at once take turns: exactly one found no champion, every other was compared
    with the champion the one before it left (so no two displaced the same one), and the
    alias ends on the best."""
    name, values = "race", (0.30, 0.40, 0.35, 0.20)
    decisions = _race(name, values, small_funksvd)
    client = mlflow.MlflowClient(tracking)
    versions = {v.version: v for v in client.search_model_versions(f"name='{name}'")}
    assert set(versions) == {d.version for d in decisions.values()} and len(versions) == 4
    assert client.get_model_version_by_alias(name, "champion").version == decisions[0.40].version
    assert decisions[0.40].promoted
    found = [d.champion_version for d in decisions.values()]
    assert found.count("") == 1, found  # one went first; the rest met a champion
    promoted = {d.version for d in decisions.values() if d.promoted}
    displaced = [d.champion_version for d in decisions.values() if d.promoted]
    assert len(set(displaced)) == len(displaced) and set(displaced) - {""} <= promoted
    for d in decisions.values():
        met = d.champion_value
        assert d.promoted == (met is None or d.value > met), d
        assert versions[d.version].tags["promotion"] == ("champion" if d.promoted else "rejected")
    assert not client.search_registered_models(f"name='{name}{registry.GATE_LOCK_SUFFIX}'")


def test_a_lock_left_by_a_dead_gate_is_broken_and_a_held_one_waited_for(tracking):
    """A gate that died holding the lock does not stop the next one for longer than the stale
    age; a live holder makes the next gate wait, and past its wait it says which lock."""
    client = mlflow.MlflowClient(tracking)
    lock = "locked" + registry.GATE_LOCK_SUFFIX
    client.create_registered_model(lock)  # as a gate that died inside its turn leaves it
    waiting = registry.gate_lock(client, "locked", wait_s=0.5, stale_s=600)
    with pytest.raises(TimeoutError, match=f"held {lock}"), waiting:
        pass
    with registry.gate_lock(client, "locked", wait_s=30, stale_s=0.1):
        assert client.get_registered_model(lock).tags.get("token")  # this gate's own now
    assert not client.search_registered_models(f"name='{lock}'")  # released


def _identity(target: str) -> registry.TaskIdentity:
    return registry.TaskIdentity("recommendation", target, "clickstream events", "ndcg@10")


def _through_register(name, identity, value, small_funksvd, champion_on_my_split=None):
    """One registration through the shared path; returns (registration, champion URIs scored)."""
    model, folder = small_funksvd
    scored: list[str] = []

    def score(uri: str) -> float:
        scored.append(uri)
        if callable(champion_on_my_split):
            return champion_on_my_split(uri)
        return champion_on_my_split

    config = registry.RegistryConfig(name, "registry-tests", "ndcg@10")
    record = registry.RunRecord(params={"k": 10}, metrics={"ndcg_at_10": value},
                                curves={1: {"loss": 0.5}, 2: {"loss": 0.4}})  # fmt: skip
    candidate = registry.Candidate(
        identity, record, lambda registered: log_pyfunc(model, folder, registered_name=registered),
        value, 0.05, score,
    )  # fmt: skip
    registration = registry.register(config, candidate, {"workload": "test"})
    return registration, scored


def test_the_gate_compares_the_champion_on_the_challengers_split(tracking, small_funksvd):
    """The champion's own recorded figure (0.30, on its data) is not what the challenger meets:
    the champion scored on the challenger's split (0.20) is."""
    name, task = "same-split", _identity("top-k items of shop A")
    first, scored = _through_register(name, task, 0.30, small_funksvd)
    assert first.decision.promoted and scored == []  # no champion yet: nothing to score
    second, scored = _through_register(name, task, 0.25, small_funksvd, champion_on_my_split=0.20)
    assert scored == [f"models:/{name}/{first.decision.version}"]
    gate = second.decision
    assert gate.promoted and gate.champion_value == 0.20 and gate.champion_version == "1"
    assert "on the same data" in gate.reason
    client = mlflow.MlflowClient(tracking)
    assert client.get_model_version_by_alias(name, "champion").version == gate.version
    tags = client.get_model_version(name, gate.version).tags
    assert tags["task.key"] == task.key() and tags["gate.champion_value"] == "0.2"
    third, _ = _through_register(name, task, 0.22, small_funksvd, champion_on_my_split=0.24)
    assert not third.decision.promoted and "does not beat champion v2's 0.2400" in (
        third.decision.reason
    )
    run = client.get_run(second.run_id)
    assert run.data.params["k"] == "10" and run.data.metrics["ndcg_at_10"] == 0.25
    assert [m.value for m in client.get_metric_history(second.run_id, "loss")] == [0.5, 0.4]


@pytest.mark.parametrize("new_champion_on_slow_split, slow_wins", [(0.45, False), (0.35, True)])
def test_a_champion_that_moved_while_scoring_is_scored_again(
    tracking, small_funksvd, monkeypatch, new_champion_on_slow_split, slow_wins
):
    """Two registrations at once: the slow one scores v1, and while it does, the fast one
    beats v1 and takes the alias. The slow one must then score the new champion on its own
    split and be gated against that; the alias is written once per promotion, to the winner."""
    name = f"moved-{slow_wins}"
    task = _identity("top-k items of shop A")
    _through_register(name, task, 0.30, small_funksvd)
    slow_scoring, fast_done = threading.Event(), threading.Event()
    written: list[str] = []
    set_alias = mlflow.MlflowClient.set_registered_model_alias

    def counting(self, model_name, alias, version):
        written.append(str(version))
        return set_alias(self, model_name, alias, version)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", counting)

    def slow_scores(uri: str) -> float:
        if uri.endswith("/1"):  # the champion it found: scoring takes long, meanwhile...
            slow_scoring.set()
            assert fast_done.wait(timeout=120)
            return 0.30
        return new_champion_on_slow_split  # the champion that took the alias meanwhile

    results = {}
    slow = threading.Thread(target=lambda: results.update(
        slow=_through_register(name, task, 0.40, small_funksvd, slow_scores)))  # fmt: skip
    slow.start()
    assert slow_scoring.wait(timeout=120)  # the slow one scores v1 ...
    results["fast"] = _through_register(name, task, 0.50, small_funksvd, 0.30)  # ... as this wins
    fast_done.set()
    slow.join(timeout=300)
    (fast, _), (late, scored) = results["fast"], results["slow"]
    assert fast.decision.promoted and fast.decision.champion_version == "1"
    fast_version = fast.decision.version
    assert scored == [f"models:/{name}/1", f"models:/{name}/{fast_version}"]  # scored again
    gate = late.decision
    assert gate.champion_version == fast_version
    assert gate.champion_value == new_champion_on_slow_split
    assert gate.promoted == slow_wins
    holder = mlflow.MlflowClient(tracking).get_model_version_by_alias(name, "champion").version
    assert holder == (gate.version if slow_wins else fast_version)
    winners = [fast_version, gate.version] if slow_wins else [fast_version]
    assert written == winners  # each promotion wrote the alias once
    if not slow_wins:
        assert f"does not beat champion v{fast_version}'s 0.4500" in gate.reason


def test_another_task_never_displaces_the_champion(tracking, small_funksvd):
    name = "one-task"
    first, _ = _through_register(name, _identity("top-k items of shop A"), 0.10, small_funksvd)
    other = _identity("top-k items of shop B")
    refused, scored = _through_register(name, other, 0.90, small_funksvd, 0.01)
    gate = refused.decision
    assert not gate.promoted and gate.version == "" and scored == []
    assert "shop A" in gate.reason and "shop B" in gate.reason
    assert f'"model_name": "{name}-' in gate.reason  # how to register it under its own name
    client = mlflow.MlflowClient(tracking)
    assert client.get_model_version_by_alias(name, "champion").version == first.decision.version
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert client.list_artifacts(refused.run_id, "model")  # logged in its run, not lost
    assert client.get_run(refused.run_id).data.tags["promotion"] == "rejected"
