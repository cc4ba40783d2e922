"""Flyte tasks of the CLIP workflow: images -> embeddings and splits -> classifier -> evaluation
-> MLflow registry. The compute lives in flyray.clip; these wrap it with types, caches, decks."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import NamedTuple

from flytekit import StructuredDataset
from flytekit.types.directory import FlyteDirectory

import images
from flyray import registry, storage
from flyray.clip import report as clip
from flyray.clip.classifier import ClassifierParams, TrainedClassifier, train_classifier
from flyray.clip.embed import EmbeddingResult, cache_key, embed_folder, matrix, resolve_model
from flyray.clip.evaluate import EvaluationReport, champion_metrics, evaluate
from flyray.clip.generate import generate_shapes
from flyray.clip.images import list_images, split_embeddings
from flyray.clip.report import TrainingReport
from flyray.raytrain import DistributedConfig
from flyray.registry import Registration, RegistryConfig, register
from tasks.platform import (
    checkpoint_uri,
    dataset_uri,
    dir_uri,
    execution_tags,
    flyray_task,
    new_output_dir,
    publish,
    sized,
)

# GPUs per Ray worker pod for the embedding and training tasks, read when registering.
WORKER_GPUS = int(os.environ.get("FLYRAY_CLIP_WORKER_GPUS", "0"))


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


class TrainOutputs(NamedTuple):
    model: FlyteDirectory
    report: TrainingReport


def _read(dataset: StructuredDataset):
    return storage.read_table(dataset_uri(dataset))


def _write(table, uri: str) -> StructuredDataset:
    fs, path = storage.filesystem(uri)
    storage.write_table(fs, f"{path}/part-00000.parquet", table)
    return StructuredDataset(uri=uri)


@flyray_task(images.clip)
def resolve_images(source: str, model: str, demo_per_class: int, demo_seed: int) -> ImageSource:
    """The image folder and a fingerprint of its content and the model's (never cached, so
    edits of either are seen, and embed_images is cached on content, not names); an empty
    `source` generates the coloured-shapes demo set: locally always into the same folder of the
    data directory (same bytes, same fingerprint, so a re-run reuses its embeddings), on a
    cluster under the execution's output prefix."""
    root = source
    if not root:
        out = new_output_dir()
        demo = registry.data_dir() / "clip-demo" / f"shapes-{demo_per_class}-{demo_seed}"
        root = storage.join(out, "shapes") if storage.is_s3(out) else str(demo)
        generate_shapes(root, per_class=demo_per_class, seed=demo_seed)
    return ImageSource(root, cache_key(resolve_model(model), list_images(root).fingerprint))


@flyray_task(images.clip, ray=True, worker_gpus=WORKER_GPUS, cache="clip-embed-1", deck=True)
def embed_images(
    root: str, fingerprint: str, model: str, config: EmbedConfig, split: SplitConfig
) -> EmbedOutputs:
    """CLIP embeddings of every image (Ray Data actor pool, reused from the parquet cache when
    model and images are unchanged), stratified splits and the training split's label map."""
    cache_uri = config.cache_uri or str(registry.data_dir() / "clip-embeddings")
    result = embed_folder(
        root, resolve_model(model), cache_uri, config.batch_size, config.max_actors,
        config.in_process,
    )  # fmt: skip
    splits = split_embeddings(
        storage.read_table(result.embeddings_uri), split.validation_fraction,
        split.test_fraction, split.seed, split.min_per_class,
    )  # fmt: skip
    publish("embeddings", *clip.embeddings_deck(result, splits))
    out = new_output_dir()
    tables = (splits.train, splits.validation, splits.test, storage.read_table(result.rejects_uri))
    names = ("train", "validation", "test", "rejects")
    written = [_write(t, storage.join(out, n)) for t, n in zip(tables, names, strict=True)]
    return EmbedOutputs(*written, splits.labels, result)


@flyray_task(images.clip, ray=DistributedConfig(), worker_gpus=WORKER_GPUS, cache="clip-train-2",
             deck=True)  # fmt: skip
def fit_clip_classifier(
    train: StructuredDataset,
    validation: StructuredDataset,
    labels: list[str],
    embedding_model: str,
    params: ClassifierParams,
    config: DistributedConfig,
    experiment: str,
) -> TrainOutputs:
    """TorchTrainer (DDP) on the embeddings; rank 0 logs per-epoch losses to a new MLflow run;
    a Flyte retry resumes from the failed attempt's last epoch checkpoint."""
    inputs = {"train": train, "params": params, "config": config}
    config = replace(config, checkpoint_uri=checkpoint_uri(config, "clip", inputs))
    tags = execution_tags("clip")
    with clip.training_run(experiment, tags, params, config, embedding_model) as run:
        model = train_classifier(
            _read(train), _read(validation), labels, resolve_model(embedding_model), params,
            config, registry.tracking_uri(), run.info.run_id,
        )  # fmt: skip
    out = storage.join(new_output_dir(), "classifier")
    model.save(out)
    report = TrainingReport.of(model, run.info.run_id)
    publish("training", *clip.training_deck(report))
    return TrainOutputs(FlyteDirectory(out, remote_directory=False), report)


@flyray_task(images.clip, sizes=True)
def train_clip_classifier(
    train: StructuredDataset,
    validation: StructuredDataset,
    labels: list[str],
    embedding_model: str,
    params: ClassifierParams,
    config: DistributedConfig,
    experiment: str,
) -> TrainOutputs:
    """fit_clip_classifier on a Ray cluster sized for this run's worker count."""
    return sized(fit_clip_classifier, config, WORKER_GPUS)(
        train=train, validation=validation, labels=labels, embedding_model=embedding_model,
        params=params, config=config, experiment=experiment,
    )  # fmt: skip


@flyray_task(images.clip, ray=True, cache="clip-evaluate-1", deck=True)
def evaluate_clip_classifier(
    model: FlyteDirectory, test: StructuredDataset, train: StructuredDataset
) -> EvaluationReport:
    """Batch inference on the held-out test split: accuracy, precision/recall/F1 (macro and
    micro) beside the majority-class baseline, and the confusion matrix."""
    classifier = TrainedClassifier.load(dir_uri(model))
    train_idx = _read(train).column("label_idx").to_numpy()
    result = evaluate(classifier, _read(test), train_idx)
    publish("evaluation", *clip.evaluation_deck(result))
    return result


@flyray_task(images.clip, deck=True)
def register_clip_classifier(
    model: FlyteDirectory,
    training: TrainingReport,
    evaluation: EvaluationReport,
    embeddings: EmbeddingResult,
    test: StructuredDataset,
    config: RegistryConfig,
) -> Registration:
    """Evaluation into the training run, the pyfunc registered, then the champion gate: the
    champion is scored on this classifier's test split."""
    classifier = TrainedClassifier.load(dir_uri(model))
    held_out = _read(test)
    registration = register(
        config, clip.identity(classifier.labels, classifier.embedding_model, config.metric),
        clip.run_record(evaluation, embeddings),
        lambda name: clip.log_model(classifier, matrix(held_out), name),
        evaluation.model.get(config.metric), evaluation.baseline.get(config.metric),
        lambda uri: champion_metrics(uri, held_out).get(config.metric),
        execution_tags("clip"), run_id=training.run_id,
    )  # fmt: skip
    publish("registry", *registration.deck())
    return registration
