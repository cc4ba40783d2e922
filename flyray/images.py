"""Labelled image folders, shared by the CNN (flyray.vision) and CLIP (flyray.clip): listing,
decoding, rejects and the stratified split, so both read the same folder the same way.

A class is the name of the folder an image sits in (`root/<class>/<image>`, at any depth). The
files are listed with pyarrow filesystems (local or s3://), read as bytes and decoded one by one
with PIL: a file that is not an image, sits outside a class folder or does not decode is kept
in a rejects table (path, label, reason, detail) instead of stopping the run, as Ray Data's
read_images would on the first bad file.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from flyray import storage
from flyray.bounds import image_size_error

# The largest image decoded (width x height): a 40-megapixel photo is 120 MB as RGB. Checked
# from the header, before decoding (flyray.bounds); serving has a smaller bound of its own.
MAX_PIXELS = 40_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
REJECTS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
# reasons
NOT_AN_IMAGE_FILE = "not_an_image_file"
NO_CLASS_FOLDER = "no_class_folder"
UNDECODABLE = "undecodable"


def reject(path: str, label: str, reason: str, detail: str) -> dict:
    """One row of a rejects table."""
    return {"path": path, "label": label, "reason": reason, "detail": detail}


@dataclass
class ImageListing:
    """Every file under a root: images with their class, the rest as rejects."""

    root: str
    paths: list[str]  # URIs of candidate images, sorted
    labels: list[str]  # class of each, its folder's name
    rejects: list[dict]  # path, label, reason, detail
    files: list[storage.InputFile]  # every file listed, images and rejects

    @cached_property
    def fingerprint(self) -> str:
        """Changes when any file's content changes (hashes local files: computed on demand)."""
        return storage.fingerprint(self.files)

    def relative(self, path: str) -> list[str]:
        """The parts of an image's path below the root."""
        return posixpath.relpath(path, storage.to_uri(*storage.filesystem(self.root))).split("/")


def list_images(root: str) -> ImageListing:
    """Images of `root/<class>/...` (any depth; the class is the innermost folder's name)."""
    files = storage.list_input_files(root, ("",))  # every file: non-images are rejects too
    base = storage.to_uri(*storage.filesystem(root))  # the form list_input_files answers in
    paths, labels, rejects = [], [], []
    for f in files:
        parent = posixpath.dirname(f.path)
        label = "" if parent.rstrip("/") == base.rstrip("/") else posixpath.basename(parent)
        if not f.path.lower().endswith(IMAGE_SUFFIXES):
            detail = f"suffix is not one of {', '.join(IMAGE_SUFFIXES)}"
            rejects.append(reject(f.path, label, NOT_AN_IMAGE_FILE, detail))
        elif not label:
            detail = "images must sit in a folder named after their class"
            rejects.append(reject(f.path, "", NO_CLASS_FOLDER, detail))
        else:
            paths.append(f.path)
            labels.append(label)
    if not paths:
        raise FileNotFoundError(
            f"no images in class folders under {root} ({len(rejects)} other files)"
        )
    return ImageListing(root, paths, labels, rejects, files)


class _TooLarge(ValueError):
    pass


def size(data: bytes) -> tuple[int, int]:
    """(width, height) from an encoded image's header, nothing decoded; ValueError if none."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for data it cannot read
        raise ValueError(f"not an image PIL can read ({type(exc).__name__}: {exc})") from exc


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """RGB image from encoded bytes, its size checked from the header first; raises ValueError
    saying why it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            too_large = image_size_error(image.size, max_pixels)
            if too_large:
                raise _TooLarge(too_large)
            return image.convert("RGB")  # convert() decodes fully: truncated files fail here
    except _TooLarge:
        raise
    except UnidentifiedImageError as exc:
        raise ValueError("not an image format PIL recognises") from exc
    except Exception as exc:  # truncated or damaged data: PIL raises OSError, SyntaxError, ...
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc


def read_image(fs: pafs.FileSystem, uri: str) -> Image.Image:
    """The decoded image of a listed file, read through `fs` (a Ray actor is handed the
    driver's); ValueError or OSError when it cannot be."""
    with fs.open_input_stream(uri.removeprefix(storage.S3_PREFIX)) as fh:
        return decode(fh.read())


def stratified_split(
    labels: Sequence[str], held_out: Sequence[float], seed: int = 0, min_per_class: int = 2
) -> list[np.ndarray]:
    """Sorted row indices of a training part and of one part per `held_out` fraction, every
    class in the same proportions in each (scikit-learn's train_test_split with stratify).
    Classes too small to be split and a single class are errors naming them."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels, dtype=object)
    classes, counts = np.unique(labels, return_counts=True)
    small = {c: int(n) for c, n in zip(classes, counts, strict=True) if n < min_per_class}
    if small:
        raise ValueError(
            f"classes with fewer than {min_per_class} images (their folders need "
            f"more to be split): {small}"
        )
    if len(classes) < 2:
        raise ValueError(f"need at least 2 class folders, found {list(classes)}")
    train, rest = train_test_split(
        np.arange(len(labels)), test_size=sum(held_out), stratify=labels, random_state=seed
    )
    parts = [train]
    for k, fraction in enumerate(held_out[:-1]):
        part, rest = train_test_split(
            rest, train_size=fraction / sum(held_out[k:]), stratify=labels[rest],
            random_state=seed,
        )  # fmt: skip
        parts.append(part)
    return [np.sort(p) for p in [*parts, rest]]
