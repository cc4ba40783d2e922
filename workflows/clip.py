"""CLIP image classification: class folders -> CLIP embeddings (Ray Data actors) -> classifier
(Ray Train, DDP) -> batch-inference evaluation -> MLflow registry behind the champion gate.

pyflyte run workflows/clip.py clip_pipeline                                     # offline demo
pyflyte run workflows/clip.py clip_pipeline --source s3://bucket/dogs/ --model s3://bucket/clip/
"""

from __future__ import annotations

from typing import NamedTuple

from flytekit import LaunchPlan, StructuredDataset, workflow
from flytekit.types.directory import FlyteDirectory

import images
from flyray.clip.classifier import ClassifierParams
from flyray.clip.config import EmbedConfig, SplitConfig
from flyray.clip.embed import EmbeddingResult
from flyray.clip.evaluate import EvaluationReport
from flyray.clip.report import TrainingReport
from flyray.raytrain import DistributedConfig
from flyray.registry import Registration, RegistryConfig
from tasks.clip import (
    embed_images,
    evaluate_clip_classifier,
    register_clip_classifier,
    resolve_images,
    train_clip_classifier,
)
from tasks.recipe import recipe_task

DEFAULT_REGISTRATION = RegistryConfig("flyray-clip", "flyray-clip", "f1_macro")


class ClipOutputs(NamedTuple):
    model: FlyteDirectory
    embeddings: EmbeddingResult
    rejects: StructuredDataset
    training: TrainingReport
    evaluation: EvaluationReport
    registration: Registration


@workflow
def clip_pipeline(
    source: str = "",
    model: str = "",
    demo_per_class: int = 60,
    demo_seed: int = 0,
    embed_config: EmbedConfig = EmbedConfig(),
    split_config: SplitConfig = SplitConfig(),
    params: ClassifierParams = ClassifierParams(),
    training: DistributedConfig = DistributedConfig(),
    registration: RegistryConfig = DEFAULT_REGISTRATION,
) -> ClipOutputs:
    """`source`: a folder of class folders (local or s3://; empty = generated coloured shapes);
    `model`: a saved CLIP folder (local or s3://) or a hub id (empty = the tiny demo CLIP,
    with the demo images only)."""
    recipe = clip_recipe(**locals())  # the inputs, recorded with the version (tasks/recipe.py)
    found = resolve_images(
        source=source, model=model, demo_per_class=demo_per_class, demo_seed=demo_seed
    )
    data = embed_images(
        root=found.root, fingerprint=found.fingerprint, model=found.model, config=embed_config,
        split=split_config,
    )  # fmt: skip
    trained = train_clip_classifier(
        train=data.train, validation=data.validation, labels=data.labels,
        embedding_model=found.model, params=params, config=training,
        experiment=registration.experiment,
    )  # fmt: skip
    evaluation = evaluate_clip_classifier(model=trained.model, test=data.test, train=data.train)
    registered = register_clip_classifier(
        model=trained.model, training=trained.report, evaluation=evaluation,
        embeddings=data.report, test=data.test, config=registration, recipe=recipe,
    )  # fmt: skip
    return ClipOutputs(
        trained.model, data.report, data.rejects, trained.report, evaluation, registered
    )


clip_recipe = recipe_task(clip_pipeline, images.clip, "clip_recipe")
clip_default = LaunchPlan.get_or_create(clip_pipeline, name="clip_default")
