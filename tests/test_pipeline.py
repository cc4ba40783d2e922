"""The main job end to end: flytekit local execution, and a `pyflyte run` subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from flyray.recsys import FunkSVDParams
from flyray.recsys.tuning import TuningConfig
from workflows.recommendation import recommendation_pipeline

SMALL = FunkSVDParams(n_factors=16, n_epochs=8, lr=0.01, reg=0.05, negatives=3, rating_min=0.0)
UNTUNED = TuningConfig(trials=0)  # these runs check training and registration (tuning: run_local)


@pytest.mark.slow
def test_pipeline_registers_evaluates_and_recommends(tmp_path, monkeypatch, flyte_cache):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FLYRAY_DATA_DIR", str(tmp_path / "data"))
    out = recommendation_pipeline(
        demo_events=40_000, params=SMALL, n_recommendations=5, tuning=UNTUNED
    )
    ev = out.evaluation
    assert ev.k == 10 and ev.model.users > 0
    assert 0 < ev.model.ndcg <= 1 and 0 < ev.popularity.ndcg <= 1
    assert ev.popularity.rmse != ev.popularity.rmse  # NaN: popularity predicts no ratings
    decision = out.registration.decision
    assert decision.version == "1" and decision.metric == "ndcg@10"
    assert decision.promoted == (ev.model.ndcg > ev.popularity.ndcg)
    assert out.registration.tracking_uri.startswith(f"sqlite:///{tmp_path / 'data'}")
    client = mlflow.MlflowClient(out.registration.tracking_uri)
    run = client.get_run(out.registration.run_id)
    assert run.data.tags["flyte.execution_id"]
    assert run.data.metrics["ndcg_at_10"] == ev.model.ndcg
    assert len(client.get_metric_history(run.info.run_id, "validation_rmse")) == 8
    training = out.training
    assert training.epochs == list(range(1, 9)) and training.workers == 2
    assert training.train_rmse[-1] < training.train_rmse[0]  # validation scores positives only
    assert sum(training.ratings_per_worker) >= training.train_ratings  # plus sampled negatives
    recs = out.recommendations.open(pd.DataFrame).all()
    assert (recs.groupby("user_id").size() == 5).all()
    again = recommendation_pipeline(
        demo_events=40_000, params=SMALL, n_recommendations=5, tuning=UNTUNED
    )
    second = again.registration.decision
    assert second.version == "2" and not (second.promoted and decision.promoted)
    # The champion is scored on the challenger's own split: the same model on the same split
    # (both runs came from the same data and seed) scores exactly the challenger's figure.
    assert second.champion_version == "1"
    assert second.champion_value == pytest.approx(again.evaluation.model.ndcg, rel=1e-6)


@pytest.mark.slow
def test_pyflyte_run_subprocess(tmp_path):
    env = {
        **os.environ,
        "FLYRAY_DATA_DIR": str(tmp_path / "data"),
        "TMPDIR": str(tmp_path),
        "RAY_TMPDIR": "/tmp",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    params = '{"n_factors": 8, "n_epochs": 3, "negatives": 2, "rating_min": 0.0}'
    proc = subprocess.run(
        [sys.executable, "-m", "flytekit.clis.sdk_in_container.pyflyte", "run",
         "workflows/recommendation.py", "recommendation_pipeline",
         "--demo_events", "20000", "--params", params],
        capture_output=True, text=True, timeout=600, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PipelineOutputs" in proc.stdout
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow' / 'mlflow.db'}")
    versions = client.search_model_versions("name='flyray-funksvd'")
    assert [int(v.version) for v in versions] == [1]
