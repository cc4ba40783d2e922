"""`make reproduce` (workflows/reproduce.py): a registered version trained again from its lineage
(recipe, commit, data digests), with the recorded and reproduced metrics side by side, and a
clear refusal when the code or the data is not what the version was trained on."""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import UTC, datetime

import mlflow
import pytest

from flyray import storage
from flyray.lineage import NotReproducible, Recorded, check_code, compare_metrics
from flyray.tabular.data import write_breast_cancer
from tasks import deployment
from tasks.recipe import encode_recipe, typed_inputs
from workflows import reproduce

COMMIT = "a" * 40


def _recorded(**tags) -> Recorded:
    lineage = {"lineage.commit": COMMIT, "lineage.dirty": "false", **tags}
    return Recorded("m", "3", "run", lineage, {"workflow": "w", "inputs": {}}, {})


def test_code_is_refused_unless_the_checkout_is_the_recorded_commit_and_clean():
    check_code(_recorded(), COMMIT)  # the same commit, both clean
    with pytest.raises(NotReproducible, match=f"trained from commit {COMMIT}; this checkout is b+"):
        check_code(_recorded(), "b" * 40)
    with pytest.raises(NotReproducible, match="uncommitted changes on top of a+"):
        check_code(_recorded(**{"lineage.dirty": "true"}), COMMIT)
    with pytest.raises(NotReproducible, match="this checkout has uncommitted changes"):
        check_code(_recorded(), COMMIT + "+dirty")
    with pytest.raises(NotReproducible, match="records no commit"):
        check_code(_recorded(**{"lineage.commit": ""}), COMMIT)


def test_metrics_compare_within_tolerance_and_timings_are_left_out():
    recorded = {"auc": 0.90, "ndcg_at_10": 0.20, "rmse": 1.0, "fit_seconds": 3.0}
    reproduced = {"auc": 0.90, "ndcg_at_10": 0.203, "rmse": 1.2, "fit_seconds": 9.0}
    rows = {key: ok for key, _, _, ok in compare_metrics(recorded, reproduced, 0.02, 1e-3)}
    assert rows == {"auc": True, "ndcg_at_10": True, "rmse": False}
    missing = compare_metrics({"auc": 0.9}, {}, 0.02, 1e-3)
    assert missing == [("auc", 0.9, None, False)]


def test_a_recipe_round_trips_the_pipelines_typed_inputs():
    from workflows.recommendation import PIPELINE_PARAMS, recommendation_pipeline

    types = recommendation_pipeline.python_interface.inputs
    inputs = {"params": dataclasses.replace(PIPELINE_PARAMS, n_factors=8), "demo_events": 5,
              "run_date": datetime(2026, 11, 2, 3, tzinfo=UTC)}  # fmt: skip
    recipe = json.loads(encode_recipe(recommendation_pipeline.name, inputs, types))
    assert recipe["workflow"] == "workflows.recommendation.recommendation_pipeline"
    assert recipe["inputs"]["run_date"] == "2026-11-02T03:00:00+00:00"
    assert typed_inputs(recommendation_pipeline, recipe["inputs"]) == inputs
    with pytest.raises(ValueError, match=r"unknown \['epochs'\]"):
        typed_inputs(recommendation_pipeline, {"epochs": 3})
    with pytest.raises(ValueError, match="demo_events='many'"):
        typed_inputs(recommendation_pipeline, {"demo_events": "many"})


def test_the_data_digest_follows_content_not_location(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x.jsonl").write_text('{"user": 1}\n')
    shutil.copytree(a, b)
    digest = storage.fingerprint(storage.list_input_files(str(a), (".jsonl",)))
    assert storage.fingerprint(storage.list_input_files(str(b), (".jsonl",))) == digest
    (b / "x.jsonl").write_text('{"user": 2}\n')
    assert storage.fingerprint(storage.list_input_files(str(b), (".jsonl",))) != digest


@pytest.fixture
def local_store(tmp_path, monkeypatch, flyte_cache):
    """An embedded MLflow store, and a clean checkout at COMMIT as far as lineage can tell (the
    suite may run in a tree with uncommitted changes)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FLYRAY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FLYRAY_CODE_VERSION", COMMIT)
    deployment.current.cache_clear()
    yield mlflow.MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow' / 'mlflow.db'}")
    deployment.current.cache_clear()


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_cluster")
def test_an_xgboost_version_reproduces_and_changed_data_is_refused(
    tmp_path, local_store, monkeypatch, capsys
):
    from flyray.tabular.train import XGBParams
    from workflows.tabular import xgboost_pipeline

    table = write_breast_cancer(str(tmp_path / "table"))
    out = xgboost_pipeline(source=table, params=XGBParams(num_boost_round=30))
    version = out.registration.decision.version
    capsys.readouterr()
    code = reproduce.main(["--model", "flyray-xgboost", "--version", version])
    printed = capsys.readouterr().out
    print(printed)
    assert code == 0
    assert f"data table: {table} unchanged" in printed
    assert "auc" in printed and "22 of 22 metrics identical" in printed  # bit for bit
    again = local_store.get_model_version("flyray-xgboost-reproduced", "1")
    recorded = local_store.get_model_version("flyray-xgboost", version)
    assert again.tags["lineage.data.table"] == recorded.tags["lineage.data.table"]
    assert local_store.get_registered_model("flyray-xgboost").aliases == {"champion": int(version)}

    # the table changed since: refused before anything runs, naming it
    write_breast_cancer(str(tmp_path / "table"), label="diagnosis")
    assert reproduce.main(["--model", "flyray-xgboost", "--version", version]) == 2
    assert f"data input table: {table} changed since version {version}" in capsys.readouterr().err
    # another commit checked out: refused, naming both
    monkeypatch.setenv("FLYRAY_CODE_VERSION", "b" * 40)
    deployment.current.cache_clear()
    assert reproduce.main(["--model", "flyray-xgboost", "--version", version]) == 2
    err = capsys.readouterr().err
    assert f"trained from commit {COMMIT}; this checkout is {'b' * 40}" in err
    # a version that does not exist
    assert reproduce.main(["--model", "flyray-xgboost", "--version", "9"]) == 2
    assert "flyray-xgboost version 9: not in the registry" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_cluster")
def test_a_recommender_version_reproduces_with_its_demo_data_generated_again(local_store, capsys):
    from flyray.recsys.tuning import TuningConfig
    from workflows.recommendation import IALS_PARAMS, recommendation_pipeline

    out = recommendation_pipeline(
        demo_events=20_000, model="ials", ials_params=dataclasses.replace(IALS_PARAMS, n_factors=8),
        tuning=TuningConfig(trials=0), ranking_users=500,
    )  # fmt: skip
    version = out.registration.decision.version
    source = out.registration.lineage["lineage.data.clickstream"].rpartition(" sha256:")[0]
    shutil.rmtree(source.rsplit("/", 1)[0])  # the generated demo file is gone
    capsys.readouterr()
    assert reproduce.main(["--model", "flyray-funksvd", "--version", version]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "clickstream: demo data, generated again from the recipe's seed" in printed
    digests = [line for line in printed.splitlines() if "data clickstream: sha256" in line]
    recorded, reproduced = digests[0].split("sha256 ")[1].split(" recorded, ")
    assert reproduced.removesuffix(" reproduced") == recorded  # the same events again
    assert "ndcg_at_10" in printed and "metrics identical" in printed
    rows = [line.split() for line in printed.splitlines() if line.startswith("ndcg_at_10")]
    assert rows[0][-1] == "yes"
