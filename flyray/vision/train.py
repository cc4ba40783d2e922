"""The same CNN trained twice: one process, and Ray Train (TensorflowTrainer) on N workers.

Both runs see the same parquet data, epochs, global batch size, learning rate and seed, and drop
the last partial batch, so each epoch takes the same number of examples and optimizer steps
(N // global_batch_size). Each records its per-epoch times, thread budgets and CPUs; test
accuracy is measured afterwards, outside the timed part, by the same `evaluate` call.

Distributed: Ray Data shards the training parquet (one equal shard per worker); every worker
keeps its shard in memory as a tf.data pipeline and MultiWorkerMirroredStrategy averages the
gradients. Every `checkpoint_every` epochs the model and the metrics of the epochs since go to
Ray Train as a checkpoint, so a failed worker restarts the run from the last one
(`max_failures`), and a run started again on the same `checkpoint_uri` resumes from it too (its
Ray Train run name is always RUN_NAME).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import socket
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import pandas as pd

from flyray import storage
from flyray.raytrain import DistributedConfig, TrainingProgress, run_config
from flyray.vision import LEGACY_KERAS_ENV
from flyray.vision.data import ImageSet, from_table, read_parquet
from flyray.vision.model import CNNParams, build_cnn

log = logging.getLogger(__name__)
MODEL_FILE = "model.keras"
RUN_NAME = "cnn"  # fixed, so that a run started again on its checkpoint_uri resumes


@dataclass
class RunReport:
    """One training run: what it took and what it was given (the report task compares two)."""

    mode: str  # "baseline" or "ray_distributed"
    training_time_seconds: float  # wall time from start of training to the trained model
    startup_seconds: float  # of which before the first epoch (workers, TF cluster, shards)
    checkpoint_seconds: float  # of which saving and reporting checkpoints (the last attempt's)
    shutdown_seconds: float  # of which after the last epoch (stopping the workers)
    resumed_from_epoch: int  # > 0: a worker failed and the run went on from this checkpoint
    epoch_seconds: list[float]
    train_loss: list[float]
    train_accuracy: list[float]
    test_accuracy: float
    test_loss: float
    workers: int
    cpus: float  # CPU budget of the whole run
    intra_op_threads: int  # per process
    inter_op_threads: int
    hosts: list[str]  # host name of the process that ran (rank 0's for the distributed run)
    nodes: int  # distinct machines the run's workers were on
    host_cpus: int  # CPUs of that host (shared by everything running on it)
    steps_per_epoch: int
    per_worker_batch_size: int
    train_examples: int
    test_examples: int
    tensorflow_version: str = ""
    keras_version: str = ""


def set_threads(threads: int) -> tuple[int, int]:
    """Size TF's thread pools (only possible before TF runs its first op in this process)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    return (
        tf.config.threading.get_intra_op_parallelism_threads(),
        tf.config.threading.get_inter_op_parallelism_threads(),
    )


def epoch_callbacks(checkpoint_every: int = 0) -> list:
    """Keras callbacks: epoch number and seconds into each epoch's logs; with checkpoint_every,
    every that many epochs (and after the last) the model goes to Ray Train as a checkpoint,
    with the logs of the epochs since as its metrics ("epochs")."""
    import tf_keras as keras

    class EpochTimer(keras.callbacks.Callback):
        train_ended = 0.0  # wall clock, like epoch_began: comparable across a run's processes

        def on_train_end(self, logs=None):
            self.train_ended = time.time()

        def on_epoch_begin(self, epoch, logs=None):
            self.began, self.began_wall = time.perf_counter(), time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs["epoch_seconds"] = time.perf_counter() - self.began
            logs["epoch_began"] = self.began_wall
            logs["epoch"] = epoch + 1

    # Ray's own ReportCheckpointCallback builds on the deprecated TensorflowCheckpoint.
    class RayReport(keras.callbacks.Callback):
        seconds = 0.0  # spent checkpointing, outside the epochs

        def __init__(self) -> None:
            super().__init__()
            self.pending: list[dict] = []  # logs of the epochs since the last checkpoint

        def on_epoch_end(self, epoch, logs=None):
            import ray.train

            self.pending.append(dict(logs))
            if (epoch + 1) % checkpoint_every and epoch + 1 != self.params["epochs"]:
                return
            began = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                self.model.save(os.path.join(tmp, MODEL_FILE))  # on every worker, as MWMS wants
                chief = ray.train.get_context().get_world_rank() == 0
                checkpoint = ray.train.Checkpoint.from_directory(tmp) if chief else None
                ray.train.report({"epochs": self.pending}, checkpoint=checkpoint)
            self.pending = []
            self.seconds += time.perf_counter() - began

    return [EpochTimer()] + ([RayReport()] if checkpoint_every else [])


def load_checkpoint(checkpoint):
    """The Keras model of a Ray Train checkpoint (local or remote storage)."""
    import tf_keras as keras

    with checkpoint.as_directory() as folder:
        return keras.models.load_model(os.path.join(folder, MODEL_FILE))


def _train_dataset(data: ImageSet, batch_size: int, seed: int):
    """In-memory pipeline, reshuffled each epoch, last partial batch dropped; repeated, so that
    steps_per_epoch bounds every epoch."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((data.images, data.labels))
    ds = ds.shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=True).repeat().prefetch(tf.data.AUTOTUNE)


def evaluate(model, data: ImageSet, batch_size: int = 256) -> tuple[float, float]:
    """(test accuracy, test loss)."""
    loss, accuracy = model.evaluate(data.images, data.labels, batch_size=batch_size, verbose=0)
    return float(accuracy), float(loss)


def _versions() -> dict:
    """Versions in this process; keras_version says which package tf.keras resolved to."""
    from importlib.metadata import version

    import tensorflow as tf

    package = tf.keras.__name__.split(".")[0]  # tf_keras under the pin, keras (3.x) without
    return {
        "tensorflow_version": tf.__version__,
        "keras_version": f"{package} {version(package.replace('_', '-'))}",
    }


def _baseline_process(train_uri: str, test_uri: str, params: CNNParams, threads: int) -> RunReport:
    os.environ.update(LEGACY_KERAS_ENV)
    intra, inter = set_threads(threads)
    import tf_keras as keras

    train, test = read_parquet(train_uri), read_parquet(test_uri)
    steps = len(train) // params.global_batch_size
    if steps == 0:
        raise ValueError(
            f"{train_uri}: {len(train)} training images, fewer than one global batch "
            f"({params.global_batch_size})"
        )
    began, began_wall = time.perf_counter(), time.time()
    keras.utils.set_random_seed(params.seed)
    model = build_cnn(train.images.shape[1:], len(train.class_names), params)
    callbacks = epoch_callbacks()
    history = model.fit(
        _train_dataset(train, params.global_batch_size, params.seed), epochs=params.epochs,
        steps_per_epoch=steps, callbacks=callbacks, verbose=0,
    )  # fmt: skip
    elapsed, ended_wall = time.perf_counter() - began, time.time()
    accuracy, loss = evaluate(model, test)
    h = history.history
    return RunReport(
        mode="baseline",
        training_time_seconds=elapsed,
        startup_seconds=h["epoch_began"][0] - began_wall,
        checkpoint_seconds=0.0,
        resumed_from_epoch=0,
        shutdown_seconds=ended_wall - callbacks[0].train_ended,
        epoch_seconds=h["epoch_seconds"],
        train_loss=h["loss"],
        train_accuracy=h["accuracy"],
        test_accuracy=accuracy,
        test_loss=loss,
        workers=1,
        cpus=float(threads),
        intra_op_threads=intra,
        inter_op_threads=inter,
        hosts=[socket.gethostname()],
        nodes=1,
        host_cpus=os.cpu_count() or 1,
        steps_per_epoch=steps,
        per_worker_batch_size=params.global_batch_size,
        train_examples=len(train),
        test_examples=len(test),
        **_versions(),
    )


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a pod's limit,
    which neither os.cpu_count nor the affinity shows)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity is the budget
    return cpus


def train_baseline(train_uri: str, test_uri: str, params: CNNParams, threads: int = 0) -> RunReport:
    """One process, TF using `threads` threads (0: every CPU this process may run on).

    It runs in a fresh (spawned) process: TF's thread pools can only be sized before TF starts,
    and the caller may have started it already.
    """
    threads = threads or available_cpus()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        report = pool.submit(_baseline_process, train_uri, test_uri, params, threads).result()
    log.info("baseline: %.1f s on %d threads, test accuracy %.4f",
             report.training_time_seconds, threads, report.test_accuracy)  # fmt: skip
    return report


def _worker_loop(config: dict) -> dict:
    """Per Ray Train worker: MultiWorkerMirroredStrategy over this worker's Ray Data shard."""
    import pyarrow as pa
    import ray.train
    import tensorflow as tf
    import tf_keras as keras

    intra, inter = set_threads(config["threads"])
    params: CNNParams = config["params"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # cluster from Ray's TF_CONFIG
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    shard = ray.train.get_dataset_shard("train")
    table = pa.concat_tables(shard.iter_batches(batch_size=None, batch_format="pyarrow"))
    data = from_table(table, config["shape"])
    per_worker = params.global_batch_size // world
    steps = len(data) // per_worker  # shards are equal (streaming_split(equal=True))
    if steps == 0:
        raise ValueError(f"worker {ctx.get_world_rank()}: {len(data)} images < one batch")
    keras.utils.set_random_seed(params.seed)
    checkpoint = ray.train.get_checkpoint()
    with strategy.scope():
        if checkpoint:  # restarted after a failure: resume from the last finished epoch
            model = load_checkpoint(checkpoint)
        else:
            model = build_cnn(tuple(config["shape"]), config["num_classes"], params)
    done = int(model.optimizer.iterations.numpy()) // steps
    # Per-replica batches from this worker's shard: no re-batching or auto-sharding by TF.
    dataset = strategy.distribute_datasets_from_function(
        lambda ictx: _train_dataset(
            data,
            ictx.get_per_replica_batch_size(per_worker * world),
            params.seed + ictx.input_pipeline_id,
        )
    )
    callbacks = epoch_callbacks(config["checkpoint_every"])
    model.fit(
        dataset, epochs=params.epochs, initial_epoch=done, steps_per_epoch=steps,
        callbacks=callbacks, verbose=0,
    )  # fmt: skip
    workers = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]  # "ip:port" each
    return {
        "workers": world,
        "host": socket.gethostname(),
        "host_cpus": os.cpu_count() or 1,
        "worker_nodes": sorted({w.rsplit(":", 1)[0] for w in workers}),
        "intra": intra,
        "inter": inter,
        "steps": steps,
        "per_worker_batch": per_worker,
        "resumed_from_epoch": done,
        "train_ended": callbacks[0].train_ended,
        "checkpoint_seconds": callbacks[1].seconds,
        **_versions(),
    }


def train_distributed(
    train_uri: str,
    test_uri: str,
    params: CNNParams,
    config: DistributedConfig,
    model_dir: str = "",
) -> RunReport:
    """TensorflowTrainer on config.workers workers (fewer after a lost node when elastic), each
    reserving and running TF on `cpus_per_worker` CPUs, the training parquet sharded by Ray Data.

    The timed part is trainer.fit(): starting the workers, TF's cluster, the data shards and
    training, which is what a user waits for; epoch_seconds are the epochs alone.
    """
    import ray
    from ray.train import ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    test = read_parquet(test_uri)
    fs, path = storage.filesystem(train_uri)
    # Read before the workers start: once they hold every CPU of a small cluster, Ray Data's
    # read tasks could not be scheduled (it hung on this 2-CPU machine).
    dataset = ray.data.read_parquet(path, filesystem=fs).materialize()
    progress = TrainingProgress(params.epochs, "CNN", "epoch", config.checkpoint_every)
    trainer = TensorflowTrainer(
        _worker_loop,
        train_loop_config={
            "params": params,
            "threads": config.cpus_per_worker,
            "checkpoint_every": config.checkpoint_every,
            "shape": list(test.images.shape[1:]),
            "num_classes": len(test.class_names),
        },
        scaling_config=ScalingConfig(
            num_workers=config.worker_count(),
            use_gpu=ray.cluster_resources().get("GPU", 0) > 0,  # a GPU per worker where there are
            resources_per_worker={"CPU": config.cpus_per_worker},
        ),
        datasets={"train": dataset},
        run_config=run_config(
            RUN_NAME, config,
            keep=None,  # every checkpoint carries the metrics of its epochs
            worker_runtime_env={"env_vars": LEGACY_KERAS_ENV},  # before TF loads in workers
            callbacks=progress.callbacks,
        )[0],
    )  # fmt: skip
    began, began_wall = time.perf_counter(), time.time()
    with progress:
        result = trainer.fit()
    elapsed, ended_wall = time.perf_counter() - began, time.time()
    info = result.return_value
    # Epochs of every attempt (and of earlier runs on the same checkpoint_uri), in report order:
    # an epoch trained again after a restart counts once, as its last run.
    reported = pd.DataFrame([e for _, m in result.best_checkpoints for e in m["epochs"]])
    history = reported.drop_duplicates("epoch", keep="last").sort_values("epoch")
    this_run = history["epoch_began"][history["epoch_began"] >= began_wall]
    model = load_checkpoint(result.checkpoint)
    accuracy, loss = evaluate(model, test)
    log.info("ray train: %.1f s on %d workers, test accuracy %.4f%s", elapsed, info["workers"],
             accuracy, f", resumed from epoch {info['resumed_from_epoch']}"
             if info["resumed_from_epoch"] else "")  # fmt: skip
    if model_dir:
        save_model(model, model_dir)
    return RunReport(
        mode="ray_distributed", training_time_seconds=elapsed,
        startup_seconds=(this_run.min() if len(this_run) else ended_wall) - began_wall,
        shutdown_seconds=ended_wall - info["train_ended"],
        checkpoint_seconds=info["checkpoint_seconds"],
        resumed_from_epoch=info["resumed_from_epoch"],
        epoch_seconds=history["epoch_seconds"].tolist(), train_loss=history["loss"].tolist(),
        train_accuracy=history["accuracy"].tolist(), test_accuracy=accuracy, test_loss=loss,
        workers=info["workers"], cpus=info["workers"] * config.cpus_per_worker,
        intra_op_threads=info["intra"], inter_op_threads=info["inter"],
        hosts=[info["host"]], nodes=len(info["worker_nodes"]), host_cpus=info["host_cpus"],
        steps_per_epoch=info["steps"],
        per_worker_batch_size=info["per_worker_batch"], train_examples=dataset.count(),
        test_examples=len(test), tensorflow_version=info["tensorflow_version"],
        keras_version=info["keras_version"],
    )  # fmt: skip


def save_model(model, uri: str) -> str:
    """`uri`/model.keras (local or s3://), written whole or not at all."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save(os.path.join(tmp, MODEL_FILE))
        with open(os.path.join(tmp, MODEL_FILE), "rb") as fh:
            data = fh.read()
    fs, path = storage.filesystem(uri)
    storage.write_atomic(fs, f"{path}/{MODEL_FILE}", data)
    return uri
