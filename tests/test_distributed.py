"""FunkSVD over Ray: DSGD equals one worker, is deterministic, resumes, survives a lost worker,
and beats the original system's gradient averaging (bench/gradient_averaging.py)."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest
import ray
from test_funksvd import synthetic

from bench import gradient_averaging
from flyray.raytrain import DistributedConfig
from flyray.recsys import FunkSVDParams, harness
from flyray.recsys import distributed as dist
from flyray.recsys.distributed import train
from flyray.recsys.model import Ratings

# Every test here but one or two runs on Ray: the session's local Ray for the module.
pytestmark = pytest.mark.usefixtures("ray_cluster")

PARAMS = FunkSVDParams(n_factors=16, n_epochs=30, lr=0.01, reg=0.05, seed=4)


@pytest.fixture(scope="module")
def data():
    df = synthetic(n_users=300, n_items=150, n=24_000)
    users, u = np.unique(df.user_id, return_inverse=True)
    items, i = np.unique(df.item_id, return_inverse=True)
    r = df.rating.to_numpy()
    tr, va = slice(0, 20_000), slice(20_000, None)
    return (Ratings(u[tr], i[tr], r[tr]), Ratings(u[va], i[va], r[va]), users, items)


def _fit(data, params=PARAMS, **cfg):
    train_r, val_r, users, items = data
    return train(
        train_r, len(users), len(items), params, DistributedConfig(**cfg), val_r, users, items
    )


def test_dsgd_with_two_workers_matches_one_worker(data):
    one = _fit(data, workers=1)
    two = _fit(data, workers=2)
    assert abs(one.history[-1].validation_rmse - two.history[-1].validation_rmse) < 0.002
    assert two.history[-1].validation_rmse < two.history[0].validation_rmse - 0.1
    assert {w["worker"] for w in two.history[0].workers} == {0, 1}
    assert sum(w["ratings"] for w in two.history[0].workers) == 20_000


def test_dsgd_is_deterministic_for_a_seed(data):
    a, b = _fit(data, workers=2), _fit(data, workers=2)
    np.testing.assert_array_equal(a.P, b.P)
    np.testing.assert_array_equal(a.Q, b.Q)


def test_resume_continues_from_the_last_checkpoint(data, tmp_path):
    uri = str(tmp_path / "ckpt")
    short = FunkSVDParams(**{**PARAMS.__dict__, "n_epochs": 3})
    first = _fit(data, short, workers=2, checkpoint_uri=uri)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir())[:3] == [
        "epoch-0001",
        "epoch-0002",
        "epoch-0003",
    ]
    # Run again to 30 epochs on the same checkpoints: only epochs 4..30 are trained.
    cont = _fit(data, PARAMS, workers=2, checkpoint_uri=uri)
    uninterrupted = _fit(data, PARAMS, workers=2)
    assert [h.seconds for h in cont.history[:3]] == [h.seconds for h in first.history]
    assert [h.epoch for h in cont.history] == list(range(1, PARAMS.n_epochs + 1))
    np.testing.assert_array_equal(cont.P, uninterrupted.P)  # same as never stopping


def test_checkpoint_from_other_settings_is_refused(data, tmp_path):
    uri = str(tmp_path / "ckpt")
    _fit(data, FunkSVDParams(n_factors=4, n_epochs=1), workers=1, checkpoint_uri=uri)
    with pytest.raises(ValueError, match="different training"):
        _fit(data, FunkSVDParams(n_factors=8, n_epochs=2), workers=1, checkpoint_uri=uri)


def test_lost_worker_resumes_from_checkpoint(data, monkeypatch, caplog):
    handles = []
    original = dist._DSGDWorker

    def options(**resources):
        def remote(*args, **kwargs):
            handle = original.options(**resources).remote(*args, **kwargs)
            handles.append(handle)
            return handle

        return SimpleNamespace(remote=remote)

    checkpoint = harness.checkpoint
    killed = []

    def kill_after_epoch_five(model, epoch, *args):
        checkpoint(model, epoch, *args)
        if epoch == 5 and not killed:
            killed.append(epoch)
            ray.kill(handles[-1])  # a worker dies between epochs

    monkeypatch.setattr(dist, "_DSGDWorker", SimpleNamespace(options=options))
    monkeypatch.setattr(harness, "checkpoint", kill_after_epoch_five)
    caplog.set_level(logging.INFO, logger=harness.__name__)
    model = _fit(data, workers=2)  # no checkpoint_uri: checkpoints in a temporary folder
    assert killed == [5] and len(handles) == 4  # two workers, started twice
    assert any(m.endswith("at epoch 5") for m in caplog.messages if "resuming" in m)
    reference = _fit(data, workers=2)
    np.testing.assert_array_equal(model.P, reference.P)
    assert [h.epoch for h in model.history] == list(range(1, PARAMS.n_epochs + 1))


def test_gradient_averaging_learns_slowly(data):
    train_r, val_r, users, items = data
    ga = gradient_averaging.train(train_r, len(users), len(items), PARAMS, 2, val_r)
    dsgd = _fit(data, workers=2)
    curve = [h.validation_rmse for h in ga.history]
    assert curve[-1] < curve[0]
    assert dsgd.history[-1].validation_rmse < curve[-1] - 0.1


def test_blocks_are_balanced():
    counts = np.random.default_rng(0).zipf(1.5, 10_000).clip(max=5_000)
    blocks, _, _ = harness.block_rows(counts, 4)
    loads = np.bincount(blocks, weights=counts)
    assert loads.max() / loads.min() < 1.05


def test_elastic_runs_take_the_workers_the_cluster_can_place():
    deadline = time.monotonic() + 30  # the actors of an earlier test may still be releasing
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "CPUs of earlier tests' actors never came back"
        time.sleep(0.1)
    free = int(ray.available_resources()["CPU"])
    assert 1 <= free < 4  # the test session's cluster has 2 CPUs
    assert harness.worker_count(DistributedConfig(workers=4)) == free  # elastic, 1..4
    assert harness.worker_count(DistributedConfig(workers=4, min_workers=3)) == 3  # at least
    assert harness.worker_count(DistributedConfig(workers=4, min_workers=0)) == 4  # fixed
    assert harness.worker_count(DistributedConfig(workers=4, cpus_per_worker=2)) == max(
        1, free // 2
    )
