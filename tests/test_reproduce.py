"""`make reproduce` (workflows/reproduce.py): a registered version trained again from its lineage
(recipe, commit, data digests), with the recorded and reproduced metrics side by side, and a
clear refusal when the code or the data is not what the version was trained on. The whole runs
reuse the pipelines of other tests (each pipeline scenario runs once): an XGBoost version in
test_tabular.py, a backfilled recommender version in test_backfill.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import UTC, datetime

import pytest

from flyray import storage
from flyray.lineage import NotReproducible, Recorded, check_code, compare_metrics
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
    recorded = {"auc": 0.90, "ndcg_at_10": 0.20, "rmse": 1.0, "fit_seconds": 3.0, "efficiency": 0.2}
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


def reproduced(model: str, version: str, capsys) -> str:
    """`make reproduce` of a version (exit 0 asserted): what it printed."""
    capsys.readouterr()
    code = reproduce.main(["--model", model, "--version", version])
    printed = capsys.readouterr().out
    print(printed)
    assert code == 0, printed
    return printed


def refused(model: str, version: str, capsys) -> str:
    """`make reproduce` of a version that must be refused (exit 2): its one-line reason."""
    capsys.readouterr()
    assert reproduce.main(["--model", model, "--version", version]) == 2
    return capsys.readouterr().err
