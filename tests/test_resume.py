"""flyray.raytrain.DistributedConfig across the Ray Train trainers: a run started again on the same
checkpoint_uri resumes from its latest checkpoint (as a Flyte retry of the task does), taken
every `checkpoint_every` rounds or epochs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from flyray.raytrain import DistributedConfig


@pytest.mark.slow
def test_xgboost_resumes_on_the_same_checkpoint_uri(tmp_path):
    from flyray.tabular.data import prepare, split_uri, write_breast_cancer
    from flyray.tabular.train import XGBParams, train_distributed

    out = str(tmp_path / "prepared")
    spec = prepare(write_breast_cancer(str(tmp_path / "in")), out)
    splits = split_uri(out, "train"), split_uri(out, "validation")
    config = DistributedConfig(checkpoint_every=5, checkpoint_uri=str(tmp_path / "ckpt"))
    first = XGBParams(num_boost_round=10, early_stopping_rounds=0)
    booster, report = train_distributed(*splits, spec, first, config)
    assert (report.rounds, report.restored_from_round, report.workers) == (10, 0, 2)
    more = XGBParams(num_boost_round=20, early_stopping_rounds=0)
    booster, report = train_distributed(*splits, spec, more, config)
    assert (booster.num_boosted_rounds(), report.restored_from_round) == (20, 10)
    assert len(report.validation_auc) == 10  # the rounds trained by this run


def _blobs(rng: np.random.Generator, centres: np.ndarray, n: int) -> pa.Table:
    y = rng.integers(0, len(centres), n)
    x = centres[y] + rng.normal(0, 1.0, (n, centres.shape[1])).astype(np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), centres.shape[1])
    return pa.table({"embedding": emb, "label_idx": pa.array(y, pa.int64())})


@pytest.mark.slow
def test_clip_classifier_resumes_on_the_same_checkpoint_uri(tmp_path):
    from flyray.clip.classifier import ClassifierParams, train_classifier

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 16)).astype(np.float32)
    train, validation = _blobs(rng, centres, 300), _blobs(rng, centres, 90)
    labels = ["a", "b", "c"]
    config = DistributedConfig(checkpoint_every=2, checkpoint_uri=str(tmp_path / "ckpt"))
    params = ClassifierParams(hidden=16, epochs=3, batch_size=32)
    first = train_classifier(train, validation, labels, "synthetic", params, config)
    assert [h.epoch for h in first.history] == [1, 2, 3] and first.workers == 2
    assert first.resumed_from_epoch == 0
    params.epochs = 5
    again = train_classifier(train, validation, labels, "synthetic", params, config)
    assert again.resumed_from_epoch == 3  # the last epoch is always checkpointed
    assert [h.epoch for h in again.history] == [1, 2, 3, 4, 5]
    assert again.history[:3] == first.history


@pytest.mark.slow
def test_cnn_resumes_on_the_same_checkpoint_uri(tmp_path):
    from flyray.vision.data import prepare
    from flyray.vision.model import CNNParams
    from flyray.vision.train import train_distributed

    prepare("", str(tmp_path / "digits"), image_size=8)
    data = str(tmp_path / "digits" / "train"), str(tmp_path / "digits" / "test")
    config = DistributedConfig(checkpoint_every=2, checkpoint_uri=str(tmp_path / "ckpt"))
    params = CNNParams(epochs=1, global_batch_size=256, filters=[4, 4, 4], dense_units=8)
    first = train_distributed(*data, params, config)
    assert (first.resumed_from_epoch, len(first.epoch_seconds), first.workers) == (0, 1, 2)
    params.epochs = 3
    again = train_distributed(*data, params, config)
    assert again.resumed_from_epoch == 1
    assert len(again.epoch_seconds) == len(again.train_loss) == 3
    assert again.epoch_seconds[0] == first.epoch_seconds[0]  # epoch 1 as the first run had it
