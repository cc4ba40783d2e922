"""Image CNN workload: loaders (CIFAR-10 python layout local and s3://, image folders, digits),
the comparison report, the cnn_benchmark workflow end to end, and its cluster serialization."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from flytekit.models.task import Resources

from flyray import storage
from flyray.raytrain import DistributedConfig
from flyray.vision import data as vd
from flyray.vision.model import CNNParams
from flyray.vision.report import build_report, compare
from flyray.vision.train import RunReport, available_cpus
from workflows import image_classification as wf

ResourceName = Resources.ResourceName


def _cifar_batch(rng, n: int) -> dict:
    return {
        b"batch_label": b"testing batch",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def _write_cifar(uri: str, n: int = 4) -> dict[str, dict]:
    """The python layout: data_batch_1..5, test_batch, batches.meta (pickles, bytes keys)."""
    rng = np.random.default_rng(0)
    batches = {name: _cifar_batch(rng, n) for name in (*vd.CIFAR_TRAIN_BATCHES, "test_batch")}
    meta = {b"label_names": [c.encode() for c in vd.CIFAR_CLASSES], b"num_vis": 3072}
    fs, root = storage.filesystem(uri)
    fs.create_dir(root, recursive=True)
    for name, content in {**batches, "batches.meta": meta}.items():
        with fs.open_output_stream(f"{root}/{name}") as fh:
            fh.write(pickle.dumps(content, protocol=2))
    return batches


def test_digits_demo_is_upscaled_rgb_and_stratified():
    from sklearn.datasets import load_digits

    train, test = vd.load_digits(32, test_fraction=0.2, seed=0)
    assert train.images.shape == (1437, 32, 32, 3) and test.images.shape == (360, 32, 32, 3)
    assert train.images.dtype == np.uint8 and train.images.max() == 255
    assert np.bincount(test.labels).min() >= 35  # every digit in the test split
    # nearest-neighbour 8 -> 32: each 4x4 block is one original pixel, the same in R, G and B
    original = load_digits().images
    block = train.images[0, ::4, ::4, 0]
    matches = np.all(np.round(original * 255 / 16) == block, axis=(1, 2))
    assert matches.any()
    assert (train.images[0, :4, :4] == train.images[0, 0, 0]).all()


def test_cifar_layout_loads_locally_and_from_s3(tmp_path, s3_env):
    import boto3

    batches = _write_cifar(str(tmp_path / "cifar"))
    train, test = vd.load_cifar10(str(tmp_path / "cifar"))
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
    assert train.class_names == vd.CIFAR_CLASSES
    first = batches["data_batch_1"]
    # row = 1024 red, 1024 green, 1024 blue, each row-major: pixel (y=2, x=5) of image 1
    for channel in range(3):
        assert train.images[1, 2, 5, channel] == first[b"data"][1, channel * 1024 + 2 * 32 + 5]
    assert train.labels[:4].tolist() == first[b"labels"]
    assert test.labels.tolist() == batches["test_batch"][b"labels"]

    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="vision")
    _write_cifar("s3://vision/cifar-10-batches-py")
    loaded = vd.load_images("s3://vision/cifar-10-batches-py", image_size=32)
    assert loaded.kind == "cifar10"
    np.testing.assert_array_equal(loaded.train.images, train.images)


def test_corrupt_cifar_batch_is_a_clear_error_naming_the_file(tmp_path):
    root = tmp_path / "cifar"
    _write_cifar(str(root))
    good = (root / "data_batch_3").read_bytes()
    (root / "data_batch_3").write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(vd.ImageDataError, match=r"data_batch_3: corrupt CIFAR-10 batch"):
        vd.load_cifar10(str(root))

    rng = np.random.default_rng(1)
    wrong = {b"data": rng.integers(0, 256, (4, 1000), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    (root / "data_batch_3").write_bytes(pickle.dumps(wrong, protocol=2))
    with pytest.raises(
        vd.ImageDataError, match=r"data_batch_3: field b'data' is uint8 \(4, 1000\)"
    ):
        vd.load_cifar10(str(root))

    (root / "data_batch_3").write_bytes(pickle.dumps(os.getcwd, protocol=2))
    with pytest.raises(vd.ImageDataError, match="data_batch_3.*refusing to load"):
        vd.load_cifar10(str(root))

    (root / "test_batch").unlink()
    (root / "data_batch_3").write_bytes(good)
    with pytest.raises(FileNotFoundError, match="test_batch"):
        vd.load_cifar10(str(root))


def _png(value: int, size: int = 12) -> bytes:
    import tensorflow as tf

    return tf.io.encode_png(np.full((size, size, 3), value, np.uint8)).numpy()


def test_image_folder_keeps_rejects_and_fails_above_the_threshold(tmp_path):
    root = tmp_path / "shapes"
    for label, value in (("dark", 20), ("light", 230)):
        (root / label).mkdir(parents=True)
        for i in range(5):
            (root / label / f"{i}.png").write_bytes(_png(value + i))
    (root / "light" / "broken.png").write_bytes(b"not an image")

    loaded = vd.load_images(str(root), image_size=16, test_fraction=0.2)
    assert loaded.kind == "image_folder" and loaded.train.class_names == ["dark", "light"]
    assert len(loaded.train) + len(loaded.test) == 10
    assert loaded.train.images.shape[1:] == (16, 16, 3)
    dark = loaded.train.images[loaded.train.labels == 0]
    assert dark.max() < 30  # resized, colours kept
    assert [r["path"] for r in loaded.rejects] == [str(root / "light" / "broken.png")]
    assert loaded.rejects[0]["reason"] == "undecodable" and loaded.rejects[0]["label"] == "light"
    assert np.bincount(loaded.test.labels).tolist() == [1, 1]  # stratified

    out = tmp_path / "prepared"
    with pytest.raises(vd.ImageDataError, match=r"1 of 11 files rejected"):
        vd.prepare(str(root), str(out), image_size=16, max_reject_fraction=0.05)
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert rejects[0]["path"].endswith("broken.png")

    summary = vd.prepare(str(root), str(out), image_size=16, max_reject_fraction=0.5)
    assert summary.rejected == 1 and summary.train_examples + summary.test_examples == 10
    back = vd.read_parquet(str(out / "train"))
    assert back.images.shape == (summary.train_examples, 16, 16, 3)
    assert back.class_names == ["dark", "light"]


def test_presplit_image_folder_keeps_its_split(tmp_path):
    root = tmp_path / "presplit"
    for split, n in (("train", 4), ("test", 2)):
        for label, value in (("dark", 20), ("light", 230)):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                (root / split / label / f"{i}.png").write_bytes(_png(value + i))
    (root / "train" / "loose.png").write_bytes(_png(100))  # in no class folder
    (root / "train" / "dark" / "notes.txt").write_text("not an image")

    loaded = vd.load_images(str(root), image_size=12)
    assert (len(loaded.train), len(loaded.test)) == (8, 4)
    assert loaded.train.class_names == ["dark", "light"]
    assert np.bincount(loaded.test.labels).tolist() == [2, 2]
    assert {r["reason"] for r in loaded.rejects} == {"no_class_folder", "not_an_image_file"}


def _run(mode, seconds, epochs, workers=1, host="node-a", nodes=1, accuracy=0.9) -> RunReport:
    return RunReport(
        mode=mode, training_time_seconds=seconds, startup_seconds=seconds - sum(epochs),
        checkpoint_seconds=0.0, shutdown_seconds=0.0, resumed_from_epoch=0, epoch_seconds=epochs,
        train_loss=[1.0] * len(epochs), train_accuracy=[0.5] * len(epochs),
        test_accuracy=accuracy, test_loss=0.3, workers=workers, cpus=2.0,
        intra_op_threads=2 // workers, inter_op_threads=2 // workers, hosts=[host], nodes=nodes,
        host_cpus=2, steps_per_epoch=22, per_worker_batch_size=64 // workers,
        train_examples=1437, test_examples=360,
    )  # fmt: skip


def test_report_speedup_and_efficiency_follow_the_recorded_times():
    baseline = _run("baseline", 925.0, [90.0] * 10)
    ray_run = _run("ray_distributed", 524.0, [50.0] * 10, workers=2, accuracy=0.88)
    report = build_report(baseline, ray_run, {"dataset": "cifar10"})
    c = report["comparison"]
    assert c["speedup"] == pytest.approx(925 / 524) and c["efficiency"] == pytest.approx(
        925 / 524 / 2
    )
    assert c["epoch_speedup"] == pytest.approx(900 / 500)
    assert c["accuracy_difference"] == pytest.approx(-0.02)
    assert report["ray_distributed"]["outside_epochs_seconds"] == pytest.approx(24.0)
    assert report["baseline"]["threads"] == {"intra_op": 2, "inter_op": 2}
    assert c["same_machine"] and "not a multi-node result" in c["note"]
    elsewhere = compare(baseline, replace(ray_run, hosts=["node-b"], nodes=2))
    assert not elsewhere.same_machine and "on 2 node(s)" in elsewhere.note
    restarted = compare(baseline, replace(ray_run, resumed_from_epoch=3))
    assert "resumed from epoch 3's checkpoint" in restarted.note


def _exit_rank_1_after_two_checkpoints(monkeypatch, storage_dir, marker) -> None:
    """Make Ray worker 1 exit once two epochs are checkpointed (once: the marker remembers):
    registered by Ray Train, that is named in its checkpoint manager snapshot, not only written."""
    import ray.train.tensorflow as rtt

    def flaky_loop(config):  # nested, so Ray ships it by value to the workers
        import glob
        import re
        import threading
        import time

        import ray.train

        from flyray.vision.train import _worker_loop

        def registered() -> int:
            names: set[str] = set()
            for path in glob.glob(os.path.join(config["storage"], "*", "checkpoint_manager_*")):
                with open(path) as fh:
                    names.update(re.findall(r"checkpoint_\d{4}-[\d_.-]+", fh.read()))
            return len(names)

        def exit_after_two_checkpoints():
            while registered() < 2:
                time.sleep(0.05)
            open(config["marker"], "w").close()
            os._exit(1)

        if ray.train.get_context().get_world_rank() == 1 and not os.path.exists(config["marker"]):
            threading.Thread(target=exit_after_two_checkpoints, daemon=True).start()
        return _worker_loop(config)

    class FlakyTrainer(rtt.TensorflowTrainer):
        def __init__(self, loop, *, train_loop_config, **kwargs):
            extra = {"marker": str(marker), "storage": str(storage_dir)}
            super().__init__(flaky_loop, train_loop_config=train_loop_config | extra, **kwargs)

    monkeypatch.setattr(rtt, "TensorflowTrainer", FlakyTrainer)


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_cluster")
def test_cnn_benchmark_end_to_end_through_a_worker_failure(
    tmp_path, monkeypatch, flyte_cache, data_dir
):
    """Both runs on the digits demo (3 epochs), the report and the registered model; a Ray
    worker dies after epoch 2 and the run resumes from its checkpoint instead of starting over."""
    storage_dir, marker = tmp_path / "ray-train", tmp_path / "worker-exited"
    _exit_rank_1_after_two_checkpoints(monkeypatch, storage_dir, marker)
    params = CNNParams(epochs=3, global_batch_size=64, filters=[16, 32, 64], dense_units=64)
    distributed = DistributedConfig(checkpoint_uri=str(storage_dir), max_failures=1)
    out = wf.cnn_benchmark(params=params, training=distributed)
    with open(out.report.download()) as fh:
        report = json.load(fh)
    base, ray_run, c = report["baseline"], report["ray_distributed"], report["comparison"]
    assert c["speedup"] == base["training_time_seconds"] / ray_run["training_time_seconds"]
    assert c["efficiency"] == c["speedup"] / ray_run["workers"] and ray_run["workers"] == 2
    assert out.comparison.speedup == c["speedup"]
    for run in (base, ray_run):
        assert run["test_accuracy"] > 0.5  # chance is 0.1 on ten digits
        assert len(run["epoch_times_seconds"]) == 3 and min(run["epoch_times_seconds"]) > 0
        assert run["training_time_seconds"] > sum(run["epoch_times_seconds"])
        assert run["train_loss"][-1] < run["train_loss"][0]
        parts = run["startup_seconds"] + run["checkpoint_seconds"] + run["shutdown_seconds"]
        assert run["startup_seconds"] > 0 and parts <= run["outside_epochs_seconds"] + 0.05
        assert run["steps_per_epoch"] == 1437 // 64 and run["test_examples"] == 360
        assert run["keras_version"] == "tf_keras 2.21.0"  # the pin holds in every process
    assert (
        marker.exists() and ray_run["resumed_from_epoch"] >= 1 and base["resumed_from_epoch"] == 0
    )
    assert "resumed from epoch" in c["note"]
    cpus = available_cpus()
    assert base["threads"]["intra_op"] == cpus and base["cpu_budget"] == cpus
    assert ray_run["threads"] == {"intra_op": 1, "inter_op": 1} and ray_run["cpu_budget"] == 2
    assert ray_run["per_worker_batch_size"] == 32
    assert c["same_machine"] and "one machine" in c["note"]
    assert report["setup"]["params"]["learning_rate"] == params.learning_rate

    decision = out.registration.decision
    assert decision.version == "1" and decision.promoted and decision.baseline_value == 0.1
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow' / 'mlflow.db'}")
    version = client.get_model_version_by_alias("flyray-cnn", "champion")
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["speedup"] == c["speedup"] and metrics["accuracy"] == ray_run["test_accuracy"]
    assert len(client.get_metric_history(version.run_id, "epoch_seconds")) == 3
    model = mlflow.pyfunc.load_model(f"models:/flyray-cnn/{version.version}")
    _, digits_test = vd.load_digits(32)
    predicted = np.argmax(np.asarray(model.predict(digits_test.images.astype(np.float32))), axis=1)
    accuracy = np.mean(predicted == digits_test.labels)
    assert accuracy == pytest.approx(ray_run["test_accuracy"], abs=1e-6)
