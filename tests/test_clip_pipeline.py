"""The CLIP workflow end to end on a tiny local CLIP model and generated images, and the
registered pyfunc answering in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from clip_helpers import CLASSES, shapes_with_bad_files, tiny_clip, untrained_classifier  # noqa: F401

from flyray import registry
from flyray.clip.classifier import ClassifierParams
from flyray.clip.pyfunc import log_pyfunc
from flyray.raytrain import DistributedConfig
from workflows.clip import clip_pipeline

SMALL = ClassifierParams(hidden=32, epochs=10, lr=0.005, batch_size=16)


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_cluster")
def test_pipeline_embeds_trains_evaluates_and_registers(
    tmp_path,
    flyte_cache,
    tiny_clip,  # noqa: F811
    data_dir,
):
    images = tmp_path / "images"
    expected_rejects = shapes_with_bad_files(images, per_class=20)
    checkpoints = tmp_path / "ray-train"
    kwargs = dict(
        source=str(images), model=tiny_clip, params=SMALL,
        training=DistributedConfig(workers=2, max_failures=1, checkpoint_uri=str(checkpoints)),
    )  # fmt: skip
    out = clip_pipeline(**kwargs)

    emb = out.embeddings
    assert (emb.embedded, emb.rejected, emb.dim) == (60, 5, 32)
    assert emb.cache_dir.startswith(str(tmp_path / "data" / "clip-embeddings"))
    rejects = out.rejects.open(pd.DataFrame).all()
    assert dict(zip(rejects.path, rejects.reason, strict=True)) == expected_rejects

    training = out.training
    assert training.workers == 2 and training.epochs == list(range(1, 11))
    assert training.train_loss[-1] < training.train_loss[0]
    assert training.validation_loss[-1] < training.validation_loss[0]
    client = mlflow.MlflowClient(training.tracking_uri)
    history = client.get_metric_history(training.run_id, "validation_loss")  # from rank 0
    assert [m.step for m in history] == training.epochs
    assert [m.value for m in history] == pytest.approx(training.validation_loss)
    saved = sorted(checkpoints.rglob("state.pt"))  # a checkpoint per epoch, the last 2 kept
    assert sorted(torch.load(p, weights_only=False)["epoch"] for p in saved) == [9, 10]

    ev = out.evaluation
    assert ev.labels == sorted(CLASSES)
    assert ev.model.rows == 9 and sum(map(sum, ev.confusion)) == 9
    assert ev.model.accuracy == pytest.approx(np.trace(ev.confusion) / 9)
    assert ev.model.f1_micro == pytest.approx(ev.model.accuracy)  # single-label: micro = acc
    assert ev.baseline.accuracy == pytest.approx(1 / 3)
    assert ev.model.f1_macro > ev.baseline.f1_macro

    reg = out.registration
    assert reg.run_id == training.run_id and reg.decision.version == "1"
    assert reg.decision.promoted and reg.decision.metric == "f1_macro"
    run = client.get_run(reg.run_id)
    assert run.data.metrics["f1_macro"] == ev.model.f1_macro
    assert run.data.metrics["majority.f1_macro"] == ev.baseline.f1_macro
    assert run.data.metrics["data.rejected"] == 5

    again = clip_pipeline(**kwargs)  # cached steps; a second version that cannot beat the first
    assert again.training.run_id == training.run_id
    assert again.registration.decision.version == "2"
    assert not again.registration.decision.promoted
    assert str(client.get_model_version_by_alias("flyray-clip", "champion").version) == "1"


def test_pyfunc_classifies_images_and_embeddings_in_a_fresh_process(
    tmp_path,
    tiny_clip,  # noqa: F811
    data_dir,
):
    registry.use_experiment("clip-pyfunc")
    shapes_with_bad_files(tmp_path / "images", per_class=2)
    files = sorted(str(p) for p in (tmp_path / "images").glob("*/0000*.png"))
    classifier, embeddings, want = untrained_classifier(tiny_clip, files)
    classifier.save(str(tmp_path / "classifier"))
    with mlflow.start_run():
        info = log_pyfunc(str(tmp_path / "classifier"), classifier, embeddings,
                          registered_name="clip-check")  # fmt: skip
    local = mlflow.artifacts.download_artifacts(info.model_uri)
    assert [p.parent.name for p in Path(local).glob("artifacts/*/config.json")] == ["tiny"]

    code = f"""
import json, mlflow, pandas as pd
from pathlib import Path
files = {files!r}
m = mlflow.pyfunc.load_model("models:/clip-check/1")
by_path = m.predict(pd.DataFrame({{"path": files}}))
by_bytes = m.predict(pd.DataFrame({{"image": [Path(f).read_bytes() for f in files]}}))
by_vector = m.predict(pd.DataFrame({{"embedding": {embeddings.tolist()!r}}}))
try:
    m.predict(pd.DataFrame({{"path": [files[0], {str(tmp_path / "images" / "blue_triangle" / "fake.jpg")!r}]}}))
    error = ""
except Exception as exc:
    error = str(exc)
print(json.dumps({{"path": by_path.label.tolist(), "bytes": by_bytes.label.tolist(),
                  "vector": by_vector.label.tolist(), "score": by_path.score.tolist(),
                  "error": error}}))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.tracking_uri(), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["path"] == answer["bytes"] == answer["vector"] == want
    assert all(1 / 3 <= s <= 1 for s in answer["score"])
    assert "row 1 (path)" in answer["error"] and "not an image format" in answer["error"]
