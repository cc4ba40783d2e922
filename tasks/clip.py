"""Flyte tasks of the CLIP workflow: images -> embeddings and splits -> classifier -> evaluation
-> MLflow registry. The compute lives in flyray.clip; these wrap it with types, caches, decks."""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from flytekit import StructuredDataset
from flytekit.types.directory import FlyteDirectory

import images
from flyray import registry, storage
from flyray.clip import report as clip
from flyray.clip.classifier import ClassifierParams, TrainedClassifier, train_classifier
from flyray.clip.config import EmbedConfig, SplitConfig
from flyray.clip.embed import (
    EmbeddingResult,
    cache_key,
    check_model,
    embed_folder,
    resolve_model,
)
from flyray.clip.evaluate import EvaluationReport, evaluate
from flyray.clip.generate import demo_inputs
from flyray.clip.images import split_embeddings
from flyray.clip.report import TrainingReport
from flyray.images import list_images
from flyray.lineage import DataInput
from flyray.raytrain import DistributedConfig
from flyray.registry import Registration, RegistryConfig
from tasks.deployment import current
from tasks.outputs import execution_tags, new_output_dir, publish, register, uri
from tasks.platform import flyray_task, minutes, sized_by_run

# GPUs per Ray worker pod for the embedding and training tasks, read when registering.
WORKER_GPUS = current().clip_worker_gpus


class ImageSource(NamedTuple):
    root: str
    fingerprint: str
    model: str  # the CLIP model every later task loads


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
    return storage.read_table(uri(dataset))


def _write(table, uri: str) -> StructuredDataset:
    fs, path = storage.filesystem(uri)
    storage.write_table(fs, f"{path}/part-00000.parquet", table)
    return StructuredDataset(uri=uri)


@flyray_task(images.clip, timeout=minutes(30))
def resolve_images(source: str, model: str, demo_per_class: int, demo_seed: int) -> ImageSource:
    """The image folder, the CLIP model, checked here before any actor loads it, and a
    fingerprint of both (never cached, so edits of either are seen, and embed_images is cached
    on content, not names). An empty `source` generates the coloured-shapes demo set and an
    empty `model` with it means the tiny demo CLIP, so the defaults run offline: locally always
    into the same folders of the data directory (same bytes, same fingerprint, so a re-run
    reuses its embeddings), on a cluster under the execution's output prefix."""
    out, local = new_output_dir(), str(registry.data_dir() / "clip-demo")
    demo = storage.join(out, "demo") if storage.is_s3(out) else local
    root, model = demo_inputs(source, model, demo, demo_per_class, demo_seed)
    model = resolve_model(model)
    check_model(model)
    return ImageSource(root, cache_key(model, list_images(root).fingerprint), model)


@flyray_task(images.clip, ray=True, worker_gpus=WORKER_GPUS, cache="clip-embed-2", deck=True,
             timeout=minutes(180))  # fmt: skip
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
    result = replace(result, fingerprint=fingerprint)
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
             deck=True, checkpoints="clip", timeout=minutes(120))  # fmt: skip
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


train_clip_classifier = sized_by_run(fit_clip_classifier, "train_clip_classifier", WORKER_GPUS)


@flyray_task(images.clip, ray=True, cache="clip-evaluate-1", deck=True, timeout=minutes(60))
def evaluate_clip_classifier(
    model: FlyteDirectory, test: StructuredDataset, train: StructuredDataset
) -> EvaluationReport:
    """Batch inference on the held-out test split: accuracy, precision/recall/F1 (macro and
    micro) beside the majority-class baseline, and the confusion matrix."""
    classifier = TrainedClassifier.load(uri(model))
    train_idx = _read(train).column("label_idx").to_numpy()
    result = evaluate(classifier, _read(test), train_idx)
    publish("evaluation", *clip.evaluation_deck(result))
    return result


@flyray_task(images.clip, deck=True, gate=True, timeout=minutes(30))
def register_clip_classifier(
    model: FlyteDirectory, training: TrainingReport, evaluation: EvaluationReport,
    embeddings: EmbeddingResult, test: StructuredDataset, config: RegistryConfig, recipe: str,
) -> Registration:  # fmt: skip
    """Evaluation into the training run, the pyfunc registered, then the champion gate: the
    champion is scored on this classifier's test split."""
    classifier = TrainedClassifier.load(uri(model))
    evidence = clip.candidate(classifier, _read(test), evaluation, embeddings, config.metric)
    data = DataInput("images", embeddings.root, embeddings.fingerprint, rows=embeddings.images)
    return register(config, evidence, images.clip, (data,), recipe, run_id=training.run_id)
