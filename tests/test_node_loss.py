"""A worker node dies mid-training on a real multi-node Ray cluster (tests/node_loss.py): each
training resumes from its last checkpoint (not from the start) and ends within 1% of the quality
of an undisturbed run, carrying on with the node that is left (FunkSVD's dsgd by design, XGBoost
and the Torch classifier as elastic Ray Train runs)."""

from __future__ import annotations

import json
import re

import pytest

from tests import background


def _scenario(name: str) -> dict:
    """The scenario's outcome: it runs in a process of its own (a session already holds one Ray
    instance), started with the session beside the other tests (tests/background.py)."""
    run = background.result(f"node_loss {name}")
    assert run.code == 0, run.stderr[-3000:]
    return json.loads((run.folder / "result.json").read_text())


@pytest.mark.e2e
@pytest.mark.background("node_loss funksvd")
def test_funksvd_dsgd_survives_losing_a_node():
    result = _scenario("funksvd")
    assert result["killed_after"] is not None
    assert len(result["lost"]) == 1
    [resumed] = [int(m) for r in result["resumes"] for m in re.findall(r"at epoch (\d+)", r)]
    assert 1 <= resumed < 20  # from the checkpoint, not from scratch
    assert result["epochs"] == list(range(1, 21))
    workers = result["workers_per_epoch"]
    assert workers[:resumed] == [2] * resumed and set(workers[resumed:]) == {1}
    _within_one_percent(result)


def _within_one_percent(result: dict) -> None:
    ref, got = result["reference"], result["disturbed"]
    assert abs(got - ref) / ref < 0.01, (ref, got)


@pytest.mark.e2e
@pytest.mark.background("node_loss xgboost")
def test_xgboost_resumes_from_its_checkpoint_after_losing_a_node():
    result = _scenario("xgboost")
    assert result["killed_after"] is not None
    assert result["restored_from"] in range(10, 60, 10)  # a checkpoint round, not round 0
    assert result["rounds"] == [60, 60]
    assert result["workers"] == [2, 1]  # finished on the node left, no replacement needed
    _within_one_percent(result)  # test AUC


@pytest.mark.e2e
@pytest.mark.background("node_loss torch")
def test_torch_classifier_resumes_from_its_checkpoint_after_losing_a_node():
    result = _scenario("torch")
    assert result["killed_after"] is not None
    assert 1 <= result["restored_from"] < 4
    assert result["epochs"] == list(range(1, 5))
    assert result["workers"] == [2, 1]
    _within_one_percent(result)  # validation accuracy
