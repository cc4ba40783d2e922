"""Fixtures shared by the CLIP tests: a tiny CLIP model saved locally and a shapes image set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flyray.clip.generate import build_tiny_clip, generate_shapes

# Nothing may be downloaded: transformers must load the local tiny model only.
os.environ["HF_HUB_OFFLINE"] = "1"
CLASSES = ("red_circle", "green_square", "blue_triangle")
PNG_HEADER = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    return build_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny"))


def shapes_with_bad_files(root: Path, per_class: int = 10) -> dict[str, str]:
    """A shapes set plus one file of each kind that must be rejected; returns path -> reason."""
    generate_shapes(str(root), classes=CLASSES, per_class=per_class, seed=1)
    good = (root / "red_circle" / "00000.png").read_bytes()
    bad = {
        root / "green_square" / "truncated.png": good[: len(good) // 2],
        root / "blue_triangle" / "fake.jpg": b"this is text, not a jpeg",
        root / "red_circle" / "empty.png": b"",
        root / "red_circle" / "notes.txt": b"annotations",
        root / "loose.png": good,
    }
    for path, data in bad.items():
        path.write_bytes(data)
    reasons = ("undecodable", "undecodable", "undecodable", "not_an_image_file", "no_class_folder")
    return {str(p): r for p, r in zip(bad, reasons, strict=True)}


def untrained_classifier(tiny_model: str, files: list[str]):
    """(classifier, embeddings of `files`, the labels it predicts for them): a seeded untrained
    classifier, enough to check that a logged model answers as the in-process one."""
    import torch

    from flyray.clip.classifier import ClassifierParams, ClipClassifier, TrainedClassifier
    from flyray.clip.embed import ClipEmbedder
    from flyray.images import decode

    torch.manual_seed(0)
    labels = sorted(CLASSES)
    classifier = TrainedClassifier(ClipClassifier(32, 3, hidden=16).eval(), labels, tiny_model,
                                   ClassifierParams(hidden=16))  # fmt: skip
    embeddings = ClipEmbedder(tiny_model).embed([decode(Path(f).read_bytes()) for f in files])
    return (
        classifier,
        embeddings,
        [labels[i] for i in classifier.predict_proba(embeddings).argmax(1)],
    )
