"""A worker node dies mid-training on a real multi-node Ray cluster: the training resumes from
its last checkpoint (not epoch 0) on what is left and ends as good as an undisturbed run."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _scenario(name: str, tmp_path) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.node_loss", name, str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_funksvd_dsgd_survives_losing_a_node(tmp_path):
    result = _scenario("funksvd", tmp_path)
    assert result["node_killed"]
    assert len(result["lost"]) == 1
    [resumed] = [int(m) for r in result["resumes"] for m in re.findall(r"at epoch (\d+)", r)]
    assert 1 <= resumed < 20  # from the checkpoint, not from scratch
    assert result["epochs"] == list(range(1, 21))
    workers = result["workers_per_epoch"]
    assert workers[:resumed] == [2] * resumed and set(workers[resumed:]) == {1}
    ref, got = result["reference_rmse"], result["disturbed_rmse"]
    assert abs(got - ref) / ref < 0.01
