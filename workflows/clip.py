"""CLIP image classification: class folders -> CLIP embeddings (Ray Data actors) -> classifier
(Ray Train, DDP) -> batch-inference evaluation -> MLflow registry behind the champion gate.

pyflyte run workflows/clip.py clip_pipeline --images s3://bucket/dogs/          # real CLIP
pyflyte run workflows/clip.py clip_pipeline --model .data/clip/tiny             # offline demo
"""

from __future__ import annotations

from typing import NamedTuple

from flytekit import LaunchPlan, StructuredDataset, workflow
from flytekit.types.directory import FlyteDirectory

from flyray.clip.classifier import ClassifierParams, TrainingConfig
from flyray.clip.embed import DEFAULT_MODEL, EmbeddingResult
from flyray.clip.evaluate import Evaluation
from flyray.registry import Registration
from tasks.clip import (
    ClipRegistryConfig,
    ClipTrainingReport,
    EmbedConfig,
    SplitConfig,
    embed_images,
    evaluate_clip_classifier,
    register_clip_classifier,
    resolve_images,
    train_clip_classifier,
)


class ClipOutputs(NamedTuple):
    model: FlyteDirectory
    embeddings: EmbeddingResult
    rejects: StructuredDataset
    training: ClipTrainingReport
    evaluation: Evaluation
    registration: Registration


DEFAULT_EMBED = EmbedConfig()
DEFAULT_SPLIT = SplitConfig()
DEFAULT_PARAMS = ClassifierParams()
DEFAULT_TRAINING = TrainingConfig()
DEFAULT_REGISTRY = ClipRegistryConfig()


@workflow
def clip_pipeline(
    images: str = "",
    model: str = DEFAULT_MODEL,
    demo_per_class: int = 60,
    demo_seed: int = 0,
    embed_config: EmbedConfig = DEFAULT_EMBED,
    split_config: SplitConfig = DEFAULT_SPLIT,
    params: ClassifierParams = DEFAULT_PARAMS,
    training: TrainingConfig = DEFAULT_TRAINING,
    registry_config: ClipRegistryConfig = DEFAULT_REGISTRY,
) -> ClipOutputs:
    """`images`: a folder of class folders (local or s3://; empty = generated coloured shapes);
    `model`: a CLIP hub id or a saved model directory (local or s3://)."""
    source = resolve_images(
        source=images, model=model, demo_per_class=demo_per_class, demo_seed=demo_seed
    )
    data = embed_images(
        root=source.root,
        fingerprint=source.fingerprint,
        model=model,
        config=embed_config,
        split=split_config,
    )
    trained = train_clip_classifier(
        train=data.train,
        validation=data.validation,
        labels=data.labels,
        embedding_model=model,
        params=params,
        config=training,
        experiment=registry_config.experiment,
    )
    evaluation = evaluate_clip_classifier(model=trained.model, test=data.test, train=data.train)
    registration = register_clip_classifier(
        model=trained.model,
        training=trained.report,
        evaluation=evaluation,
        embeddings=data.report,
        test=data.test,
        config=registry_config,
    )
    return ClipOutputs(
        trained.model, data.report, data.rejects, trained.report, evaluation, registration
    )


clip_default = LaunchPlan.get_or_create(clip_pipeline, name="clip_default")
