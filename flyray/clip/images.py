"""The labelled image set: class folders (local or s3://), decoding, rejects, splits, label map.

Ray Data's read_images fails the whole read on the first undecodable file, so the files are
listed here (pyarrow filesystems), read as bytes and decoded with PIL one by one: a corrupt or
non-image file is counted, named and kept in a rejects table instead of stopping the run.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from flyray import storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
REJECTS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


@dataclass
class ImageListing:
    """Every file under a root: images with their class, the rest as rejects."""

    root: str
    paths: list[str]  # URIs of candidate images, sorted
    labels: list[str]  # class of each, its folder's name
    rejects: list[dict]  # path, label, reason, detail
    fingerprint: str  # changes when any file's content changes


def class_of(root: str, path: str) -> str:
    """The name of the folder holding the file; "" for a file directly under the root."""
    parent = posixpath.dirname(path.replace("\\", "/"))
    return (
        ""
        if parent.rstrip("/") == root.replace("\\", "/").rstrip("/")
        else (posixpath.basename(parent))
    )


def list_images(root: str) -> ImageListing:
    """Images of `root/<class>/...` (any depth; the class is the innermost folder's name)."""
    files = storage.list_input_files(root, ("",))  # every file: non-images are rejects too
    base = storage.to_uri(*storage.filesystem(root))  # the form list_input_files answers in
    paths, labels, rejects = [], [], []
    for f in files:
        label = class_of(base, f.path)
        if not f.path.lower().endswith(IMAGE_SUFFIXES):
            rejects.append(
                _reject(
                    f.path,
                    label,
                    "not_an_image_file",
                    f"suffix is not one of {', '.join(IMAGE_SUFFIXES)}",
                )
            )
        elif not label:
            rejects.append(
                _reject(
                    f.path,
                    "",
                    "no_class_folder",
                    "images must sit in a folder named after their class",
                )
            )
        else:
            paths.append(f.path)
            labels.append(label)
    if not paths:
        raise FileNotFoundError(
            f"no images in class folders under {root} ({len(rejects)} other files)"
        )
    return ImageListing(root, paths, labels, rejects, storage.fingerprint(files))


def _reject(path: str, label: str, reason: str, detail: str) -> dict:
    return {"path": path, "label": label, "reason": reason, "detail": detail}


def decode(data: bytes) -> Image.Image:
    """RGB image from encoded bytes; raises ValueError saying why it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")  # convert() decodes fully: truncated files fail here
    except UnidentifiedImageError as exc:
        raise ValueError("not an image format PIL recognises") from exc
    except Exception as exc:  # truncated or damaged data: PIL raises OSError, SyntaxError, ...
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc


@dataclass
class Splits:
    train: pa.Table
    validation: pa.Table
    test: pa.Table
    labels: list[str]  # the label map: label_idx -> class, fitted on the training split


def split_embeddings(
    table: pa.Table,
    validation_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    min_per_class: int = 5,
) -> Splits:
    """Stratified train/validation/test split of (path, label, embedding) rows, plus label_idx
    from a label map fitted on the training split only."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import LabelEncoder

    labels = np.asarray(table["label"].to_pylist(), dtype=object)
    classes, counts = np.unique(labels, return_counts=True)
    small = {c: int(n) for c, n in zip(classes, counts, strict=True) if n < min_per_class}
    if small:
        raise ValueError(
            f"classes with fewer than {min_per_class} images (their folders need "
            f"more to be split): {small}"
        )
    if len(classes) < 2:
        raise ValueError(f"need at least 2 class folders, found {list(classes)}")
    index = np.arange(len(labels))
    held = validation_fraction + test_fraction
    train_i, rest_i = train_test_split(index, test_size=held, stratify=labels, random_state=seed)
    val_i, test_i = train_test_split(
        rest_i, test_size=test_fraction / held, stratify=labels[rest_i], random_state=seed
    )
    encoder = LabelEncoder().fit(labels[train_i])

    def part(rows: np.ndarray) -> pa.Table:
        rows = np.sort(rows)
        sub = table.take(pa.array(rows))
        idx = encoder.transform(labels[rows]).astype(np.int64)
        return sub.append_column("label_idx", pa.array(idx))

    return Splits(part(train_i), part(val_i), part(test_i), [str(c) for c in encoder.classes_])
