"""Flyte tasks of the CLIP workflow: images -> embeddings and splits -> classifier -> evaluation
-> MLflow registry. The compute lives in flyray.clip; these wrap it with types, caches, decks."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import mlflow
import numpy as np
import pyarrow.parquet as pq
from flytekit import Cache, StructuredDataset, current_context, task
from flytekit.types.directory import FlyteDirectory

import images
from flyray import registry, storage
from flyray.clip.classifier import (
    ClassifierParams,
    TrainedClassifier,
    TrainingConfig,
    train_classifier,
)
from flyray.clip.embed import EmbeddingResult, cache_key, embed_folder, matrix, resolve_model
from flyray.clip.evaluate import Evaluation, evaluate
from flyray.clip.generate import generate_shapes
from flyray.clip.images import list_images, split_embeddings
from flyray.clip.pyfunc import log_pyfunc
from flyray.registry import Registration, champion_gate
from tasks import decks
from tasks.runtime import (
    dataset_uri,
    dir_uri,
    export_s3_secrets,
    new_output_dir,
    ray_job,
    s3_secret_requests,
    setup_logging,
    transient_retries,
)

# GPUs per Ray worker pod for the embedding and training tasks, read when registering.
GPU_JOB = ray_job(worker_gpus=int(os.environ.get("FLYRAY_CLIP_WORKER_GPUS", "0")))


@dataclass
class EmbedConfig:
    batch_size: int = 64  # images per forward pass
    max_actors: int = 0  # embedding actors; 0 = one per GPU, or per CPU without GPUs
    in_process: bool = False  # no actors: embed in the task's process (one small machine)
    cache_uri: str = ""  # embeddings cache (local or s3://); "" = <FLYRAY_DATA_DIR>/clip-embeddings


@dataclass
class SplitConfig:
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    min_per_class: int = 5


@dataclass
class ClipRegistryConfig:
    model_name: str = "flyray-clip"
    experiment: str = "flyray-clip"
    metric: str = "f1_macro"  # the gate's metric (higher is better); the baseline is majority


class ImageSource(NamedTuple):
    root: str
    fingerprint: str


class EmbedOutputs(NamedTuple):
    train: StructuredDataset
    validation: StructuredDataset
    test: StructuredDataset
    rejects: StructuredDataset
    labels: list[str]
    report: EmbeddingResult


@dataclass
class ClipTrainingReport:
    workers: int
    epochs: list[int]
    train_loss: list[float]
    validation_loss: list[float]
    validation_accuracy: list[float]
    tracking_uri: str
    run_id: str  # the MLflow run rank 0 logged the curves to; registration continues it


class ClipTrainOutputs(NamedTuple):
    model: FlyteDirectory
    report: ClipTrainingReport


def _read(dataset: StructuredDataset):
    fs, path = storage.filesystem(dataset_uri(dataset))
    return pq.read_table(path, filesystem=fs)


def _write(table, uri: str) -> StructuredDataset:
    fs, path = storage.filesystem(uri)
    fs.create_dir(path, recursive=True)
    pq.write_table(table, f"{path}/part-00000.parquet", filesystem=fs)
    return StructuredDataset(uri=uri)


@task(container_image=images.clip, retries=2, secret_requests=s3_secret_requests())
@transient_retries
def resolve_images(source: str, model: str, demo_per_class: int, demo_seed: int) -> ImageSource:
    """The image folder and a fingerprint of its content and the model's (never cached, so
    edits of either are seen, and embed_images is cached on content, not names); an empty
    `source` generates the coloured-shapes demo set: locally always into the same folder of the
    data directory (same bytes, same fingerprint, so a re-run reuses its embeddings), on a
    cluster under the execution's output prefix."""
    setup_logging()
    export_s3_secrets()
    root = source
    if not root:
        out = new_output_dir()
        demo = registry.data_dir() / "clip-demo" / f"shapes-{demo_per_class}-{demo_seed}"
        root = storage.join(out, "shapes") if storage.is_s3(out) else str(demo)
        generate_shapes(root, per_class=demo_per_class, seed=demo_seed)
    return ImageSource(root, cache_key(resolve_model(model), list_images(root).fingerprint))


@task(
    container_image=images.clip,
    task_config=GPU_JOB,
    cache=Cache(version="clip-embed-1", serialize=True),
    retries=2,
    secret_requests=s3_secret_requests(),
    enable_deck=True,
)
@transient_retries
def embed_images(
    root: str, fingerprint: str, model: str, config: EmbedConfig, split: SplitConfig
) -> EmbedOutputs:
    """CLIP embeddings of every image (Ray Data actor pool, reused from the parquet cache when
    model and images are unchanged), stratified splits and the training split's label map."""
    setup_logging()
    export_s3_secrets()
    cache_uri = config.cache_uri or str(registry.data_dir() / "clip-embeddings")
    result = embed_folder(
        root, resolve_model(model), cache_uri, config.batch_size, config.max_actors,
        config.in_process,
    )  # fmt: skip
    fs, path = storage.filesystem(result.embeddings_uri)
    splits = split_embeddings(
        pq.read_table(path, filesystem=fs),
        split.validation_fraction,
        split.test_fraction,
        split.seed,
        split.min_per_class,
    )
    out = new_output_dir()
    rejects_fs, rejects_path = storage.filesystem(result.rejects_uri)
    counts = {
        label: {
            name: int((t["label_idx"].to_numpy() == i).sum())
            for name, t in (
                ("train", splits.train),
                ("validation", splits.validation),
                ("test", splits.test),
            )
        }
        for i, label in enumerate(splits.labels)
    }
    decks.publish(
        "embeddings",
        decks.table_html(
            {k: v for k, v in asdict(result).items() if k != "rejected_files"}, "Embedding step"
        ),
        decks.table_html([{"class": k, **v} for k, v in counts.items()], "Images per split"),
        decks.table_html([{"file": f} for f in result.rejected_files], "Rejected files"),
    )
    return EmbedOutputs(
        _write(splits.train, storage.join(out, "train")),
        _write(splits.validation, storage.join(out, "validation")),
        _write(splits.test, storage.join(out, "test")),
        _write(pq.read_table(rejects_path, filesystem=rejects_fs), storage.join(out, "rejects")),
        splits.labels,
        result,
    )


@task(
    container_image=images.clip,
    task_config=GPU_JOB,
    cache=Cache(version="clip-train-1", serialize=True),
    retries=2,
    secret_requests=s3_secret_requests(),
    enable_deck=True,
)
@transient_retries
def train_clip_classifier(
    train: StructuredDataset,
    validation: StructuredDataset,
    labels: list[str],
    embedding_model: str,
    params: ClassifierParams,
    config: TrainingConfig,
    experiment: str,
) -> ClipTrainOutputs:
    """TorchTrainer (DDP) on the embeddings; rank 0 logs per-epoch losses to a new MLflow run."""
    setup_logging()
    export_s3_secrets()
    registry.use_experiment(experiment)
    execution = current_context().execution_id
    if not config.storage_uri:
        config = replace(config, storage_uri=storage.join(new_output_dir(), "ray-train"))
    with mlflow.start_run(tags={"flyte.execution_id": execution.name, "workload": "clip"}) as run:
        mlflow.log_params({f"classifier.{k}": v for k, v in asdict(params).items()})
        mlflow.log_params(
            {"training.workers": config.num_workers, "embedding_model": embedding_model}
        )
        model = train_classifier(
            _read(train),
            _read(validation),
            labels,
            resolve_model(embedding_model),
            params,
            config,
            registry.tracking_uri(),
            run.info.run_id,
        )
    out = storage.join(new_output_dir(), "classifier")
    model.save(out)
    h = model.history
    report = ClipTrainingReport(
        model.workers,
        [e.epoch for e in h],
        [e.train_loss for e in h],
        [e.validation_loss for e in h],
        [e.validation_accuracy for e in h],
        registry.tracking_uri(),
        run.info.run_id,
    )
    decks.publish(
        "training",
        decks.line_chart_html(
            report.epochs,
            {"train loss": report.train_loss, "validation loss": report.validation_loss},
            "Classifier training curves",
            "epoch",
            "cross-entropy",
        ),
    )
    return ClipTrainOutputs(FlyteDirectory(out, remote_directory=False), report)


@task(
    container_image=images.clip,
    task_config=ray_job(),
    cache=Cache(version="clip-evaluate-1", serialize=True),
    retries=1,
    enable_deck=True,
)
@transient_retries
def evaluate_clip_classifier(
    model: FlyteDirectory, test: StructuredDataset, train: StructuredDataset
) -> Evaluation:
    """Batch inference on the held-out test split: accuracy, precision/recall/F1 (macro and
    micro) beside the majority-class baseline, and the confusion matrix."""
    setup_logging()
    classifier = TrainedClassifier.load(dir_uri(model))
    train_idx = _read(train).column("label_idx").to_numpy()
    result = evaluate(classifier, _read(test), train_idx)
    decks.publish(
        "evaluation",
        decks.table_html([asdict(result.model), asdict(result.baseline)], "Held-out test split"),
        decks.figure_html(confusion_figure(result.confusion, result.labels)),
        decks.bar_chart_html(
            dict(zip(result.labels, result.per_class_f1, strict=True)), "F1 per class", "F1"
        ),
    )
    return result


def confusion_figure(confusion: list[list[int]], labels: list[str]):
    """A matplotlib heat map of the confusion matrix (rows true, columns predicted)."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(confusion), display_labels=labels).plot(
        ax=ax, xticks_rotation=45, colorbar=False
    )
    ax.set_title("Confusion matrix (test split)")
    return fig


@task(
    container_image=images.clip,
    retries=2,
    secret_requests=s3_secret_requests(),
    enable_deck=True,
)
@transient_retries
def register_clip_classifier(
    model: FlyteDirectory,
    training: ClipTrainingReport,
    evaluation: Evaluation,
    embeddings: EmbeddingResult,
    test: StructuredDataset,
    config: ClipRegistryConfig,
) -> Registration:
    """Evaluation into the training run, the pyfunc registered, then the shared champion gate."""
    setup_logging()
    export_s3_secrets()
    registry.use_experiment(config.experiment)
    classifier = TrainedClassifier.load(dir_uri(model))
    execution = current_context().execution_id
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=training.run_id) as run:
        mlflow.set_tags(
            {
                "flyte.execution_id": execution.name,
                "flyte.project": execution.project,
                "flyte.domain": execution.domain,
            }
        )
        mlflow.log_metrics(evaluation.model.as_mlflow())
        mlflow.log_metrics({f"majority.{k}": v for k, v in evaluation.baseline.as_mlflow().items()})
        mlflow.log_metrics(
            {"data.embedded": embeddings.embedded, "data.rejected": embeddings.rejected}
        )
        mlflow.log_dict(asdict(embeddings), "embeddings.json")
        mlflow.log_dict(
            {"labels": evaluation.labels, "confusion": evaluation.confusion},
            "confusion_matrix.json",
        )
        classifier.save(f"{tmp}/classifier")
        info = log_pyfunc(
            f"{tmp}/classifier", classifier, matrix(_read(test)), registered_name=config.model_name
        )
        version = str(info.registered_model_version)
        decision = champion_gate(
            config.model_name,
            version,
            config.metric,
            evaluation.model.get(config.metric),
            baseline_value=evaluation.baseline.get(config.metric),
        )
        mlflow.set_tags(
            {
                "promotion": "champion" if decision.promoted else "rejected",
                "promotion_reason": decision.reason,
            }
        )
    decks.publish("registry", decks.table_html(asdict(decision), "Champion gate"))
    return Registration(registry.tracking_uri(), run.info.run_id, decision)
