"""The main job end to end in flytekit's local execution (`pyflyte run` as a subprocess:
test_secrets.py; `make run`: test_console.py; the packaged workflow on a cluster: the rehearsal)."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from flyray.lineage import DataInput
from flyray.recsys import FunkSVDParams
from flyray.recsys.tuning import TuningConfig
from workflows.recommendation import recommendation_pipeline

SMALL = FunkSVDParams(n_factors=16, n_epochs=8, lr=0.01, reg=0.05, negatives=3, rating_min=0.0)
UNTUNED = TuningConfig(trials=0)  # these runs check training and registration (tuning: run_local)


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_cluster")
def test_pipeline_registers_evaluates_and_recommends(tmp_path, flyte_cache, data_dir):
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
    assert out.registration.tracking_uri.startswith(f"sqlite:///{data_dir}")
    client = mlflow.MlflowClient(out.registration.tracking_uri)
    run = client.get_run(out.registration.run_id)
    assert run.data.tags["flyte.execution_id"]
    # lineage (flyray.lineage): the code, the image and its locked requirements, the data with
    # its digest, on the version as on the run
    tags = client.get_model_version("flyray-funksvd", "1").tags
    assert (
        tags["lineage.commit"] == run.data.tags["lineage.commit"]
        and len(tags["lineage.commit"]) == 40
    )
    assert tags["lineage.image"].rsplit(":", 1)[0].endswith("/flyray-recommender")
    assert len(tags["lineage.requirements_sha256"]) == 64
    assert (
        tags["lineage.execution"].startswith("local/local/local/")
        and "/pid-" in tags["lineage.execution"]
    )  # a local run, named by host, process and time
    source, digest = DataInput.read_tag(tags["lineage.data.clickstream"])
    assert len(digest) == 64 and source
    [dataset] = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("clickstream", digest[:32])
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
