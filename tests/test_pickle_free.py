"""Registered pyfuncs load without pickle: the FunkSVD and CLIP champions, registered through the
one registration path against a real `mlflow server`, are loaded by `models:/<name>@champion` in
a fresh process with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false and answer as the models do; each
version carries its evaluation as LoggedModel metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from clip_helpers import CLASSES, tiny_clip, untrained_classifier  # noqa: F401
from test_funksvd import synthetic

from flyray import registry
from flyray.clip.generate import generate_shapes
from flyray.clip.pyfunc import log_pyfunc as log_clip
from flyray.recsys import FunkSVD
from flyray.recsys.pyfunc import log_pyfunc as log_factors

NO_PICKLE = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


def _register(name: str, metrics: dict[str, float], metric: str, log_model) -> str:
    """Through registry.register (no champion yet, beats its baseline: it becomes champion)."""
    identity = registry.TaskIdentity("pickle-free", name, "test inputs", metric)
    record = registry.RunRecord(params={"check": "pickle-free"}, metrics=metrics)
    candidate = registry.Candidate(identity, record, log_model, metrics[registry.metric_key(
        metric)], 0.0, lambda uri: 0.0)  # fmt: skip
    decision = registry.register(registry.RegistryConfig(name, "pickle-free", metric),
                                 candidate).decision  # fmt: skip
    assert decision.promoted, decision.reason
    return decision.version


def _fresh_process(code: str, tracking: str, cwd: Path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, NO_PICKLE: "false",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_code_model(name: str, version: str, metrics: dict[str, float]) -> None:
    """The stored model is code plus files (no pickled python_model), and its version shows the
    evaluation as the LoggedModel's metrics."""
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, version)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["model_code_path"].endswith("pyfunc_model.py") and "python_model" not in pyfunc
    assert not list(local.rglob("*.pkl"))
    # The version's source is its LoggedModel (the REST API leaves ModelVersion.model_id empty).
    assert mv.source.startswith("models:/m-"), mv.source
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert {m.key: m.value for m in logged.metrics} == pytest.approx(metrics)


def test_funksvd_champion_loads_without_pickle_and_answers(tracking, tmp_path):
    model = FunkSVD(n_factors=4, n_epochs=3).fit(synthetic(n=3_000))
    model.save(str(tmp_path / "funksvd"))
    metrics = {"ndcg_at_10": 0.21, "recall_at_10": 0.3}
    version = _register("pickle-free-funksvd", metrics, "ndcg@10",
                        lambda name: log_factors(model, str(tmp_path / "funksvd"), name))  # fmt: skip
    _assert_code_model("pickle-free-funksvd", version, metrics)
    users, item = model.user_ids[:3].tolist(), int(model.item_ids[0])
    answer = _fresh_process(f"""
import json, mlflow, pandas as pd
m = mlflow.pyfunc.load_model("models:/pickle-free-funksvd@champion")
top = m.predict(pd.DataFrame({{"user_id": {users}}}), params={{"n": 5}})
pair = m.predict(pd.DataFrame({{"user_id": [{users[0]}], "item_id": [{item}]}}))
print(json.dumps({{"top": top.item_id.tolist(), "score": float(pair.score[0])}}))
""", tracking, tmp_path)  # fmt: skip
    assert answer["top"] == model.recommend(users, n=5).item_id.tolist()
    assert answer["score"] == pytest.approx(float(model.score([users[0]], [item])[0]), rel=1e-5)


def test_clip_champion_loads_without_pickle_and_answers(tracking, tmp_path, tiny_clip):  # noqa: F811
    generate_shapes(str(tmp_path / "images"), classes=CLASSES, per_class=2, seed=1)
    files = sorted(str(p) for p in (tmp_path / "images").glob("*/*.png"))
    classifier, embeddings, want = untrained_classifier(tiny_clip, files)
    classifier.save(str(tmp_path / "classifier"))
    metrics = {"f1_macro": 0.8, "accuracy": 0.75}
    version = _register(
        "pickle-free-clip", metrics, "f1_macro",
        lambda name: log_clip(str(tmp_path / "classifier"), classifier, embeddings, name),
    )  # fmt: skip
    _assert_code_model("pickle-free-clip", version, metrics)
    answer = _fresh_process(f"""
import json, mlflow, pandas as pd
m = mlflow.pyfunc.load_model("models:/pickle-free-clip@champion")
by_path = m.predict(pd.DataFrame({{"path": {files!r}}}))
by_vector = m.predict(pd.DataFrame({{"embedding": {embeddings.tolist()!r}}}))
print(json.dumps({{"path": by_path.label.tolist(), "vector": by_vector.label.tolist()}}))
""", tracking, tmp_path)  # fmt: skip
    assert answer["path"] == answer["vector"] == want


def test_a_pickled_pyfunc_is_refused_in_the_same_setting(tracking, tmp_path):
    """The control: the way the pyfuncs were logged before (a pickled PythonModel) does not load
    in that process, so the tests above prove that the models are free of pickle."""

    class Pickled(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return np.zeros(len(model_input))

    registry.use_experiment("pickle-free")
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=Pickled(),
                                registered_model_name="pickle-free-control")  # fmt: skip
    code = "import mlflow; mlflow.pyfunc.load_model('models:/pickle-free-control/1')"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, NO_PICKLE: "false"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0
    assert "Deserializing model using pickle is disallowed" in proc.stderr


def test_every_torch_load_refuses_pickled_code():
    """A checkpoint comes from a bucket other pods can write: every torch.load in flyray passes
    weights_only=True, which refuses the pickled object below instead of running it."""
    import ast
    import io

    import torch

    calls = []
    for path in Path(registry.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and ast.unparse(k.value) == "True"
                           for k in node.keywords)  # fmt: skip
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert len(calls) >= 3 and all(safe for _, safe in calls), calls

    class Payload:
        def __reduce__(self):
            return (print, ("code ran on load",))

    buffer = io.BytesIO()
    torch.save({"epoch": 3, "history": Payload()}, buffer)
    buffer.seek(0)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(buffer, weights_only=True)
