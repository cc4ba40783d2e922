"""Image data for the CNN: CIFAR-10's python layout, image folders, and an offline demo set.

Every loader returns uint8 images (N, H, W, 3) and int64 labels. Between steps the images live
in parquet (`image`: fixed_size_list<uint8>, `label`: int64), which pyarrow reads in one piece
for the single-process run and Ray Data shards across the distributed run's workers.

Sources (`load_images`):
  ""                          scikit-learn's bundled 8x8 digits (offline demo), upscaled
  <dir or s3://> with data_batch_1..5 and test_batch   CIFAR-10, python version
  <dir or s3://> of <class>/<image> files (optionally under train/ and test/)   image folder,
                              listed, decoded and split as flyray.images does for CLIP too
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from flyray import storage
from flyray.images import (
    NO_CLASS_FOLDER,
    REJECTS_SCHEMA,
    UNDECODABLE,
    list_images,
    read_image,
    reject,
    stratified_split,
)

log = logging.getLogger(__name__)

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_META = "batches.meta"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]  # fmt: skip
METADATA_KEY = b"flyray.vision"


class ImageDataError(ValueError):
    """Input that is not what the loader expects; the message names the file and the field."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class LoadedImages:
    train: ImageSet
    test: ImageSet
    kind: str  # "digits", "cifar10" or "image_folder"
    rejects: list[dict] = field(default_factory=list)  # path, label, reason, detail per file


def load_images(
    source: str, image_size: int = 32, test_fraction: float = 0.2, seed: int = 0
) -> LoadedImages:
    """The dataset a source names (see the module docstring), at image_size x image_size x 3."""
    if not source:
        train, test = load_digits(image_size, test_fraction, seed)
        return LoadedImages(train, test, "digits")
    fs, path = storage.filesystem(source)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"image source {source} is not a directory")
    if fs.get_file_info(posixpath.join(path, CIFAR_TEST_BATCH)).type == pafs.FileType.File:
        train, test = load_cifar10(source)
        return LoadedImages(resize(train, image_size), resize(test, image_size), "cifar10")
    train, test, rejects = load_image_folder(source, image_size, test_fraction, seed)
    return LoadedImages(train, test, "image_folder", rejects)


def load_digits(
    image_size: int = 32, test_fraction: float = 0.2, seed: int = 0
) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's 1,797 8x8 digits (0..16) as RGB uint8, upscaled, stratified split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    gray = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    names = [str(n) for n in digits.target_names]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target.astype(np.int64), test_size=test_fraction, random_state=seed,
        stratify=digits.target,
    )  # fmt: skip
    return (
        resize(ImageSet(x_tr, y_tr, names), image_size),
        resize(ImageSet(x_te, y_te, names), image_size),
    )


def resize(data: ImageSet, size: int) -> ImageSet:
    """Images at size x size; nearest-neighbour for whole-number upscaling (digits 8 -> 32)."""
    h, w = data.images.shape[1:3]
    if (h, w) == (size, size):
        return data
    import tensorflow as tf

    method = "nearest" if size % h == 0 and size % w == 0 else "bilinear"
    out = tf.image.resize(data.images, (size, size), method=method, antialias=method != "nearest")
    images = np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)
    return ImageSet(images, data.labels, data.class_names)


class _BatchUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles, which can run code: allow only what numpy arrays need."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_bytes(uri: str) -> bytes:
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"CIFAR-10 batch file missing: {uri}")
    with fs.open_input_stream(path) as fh:
        return fh.read()


def read_cifar_batch(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: (images uint8 (N, 32, 32, 3), labels int64). Errors name the file."""
    expected = "a pickled dict with b'data' uint8 (N, 3072) and b'labels' (N ints 0..9)"
    try:
        batch = _BatchUnpickler(io.BytesIO(_read_bytes(uri)), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as err:  # fmt: skip
        message = f"{uri}: corrupt CIFAR-10 batch ({err!r}), expected {expected}"
        raise ImageDataError(message) from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ImageDataError(f"{uri}: expected {expected}, found {keys}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ImageDataError(
            f"{uri}: field b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ImageDataError(
            f"{uri}: field b'labels' has {labels.shape} {labels.dtype}, expected {len(data)} ints"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        found = f"{labels.min()}..{labels.max()}"
        raise ImageDataError(f"{uri}: field b'labels' has values {found}, expected 0..9")
    # Rows are 1024 red, 1024 green, 1024 blue values, each plane row-major: to NHWC.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels.astype(np.int64)


def load_cifar10(uri: str) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10, python version (cifar-10-batches-py), from a local directory or s3://."""
    parts = [read_cifar_batch(storage.join(uri, name)) for name in CIFAR_TRAIN_BATCHES]
    test_x, test_y = read_cifar_batch(storage.join(uri, CIFAR_TEST_BATCH))
    names = CIFAR_CLASSES
    try:
        meta = _BatchUnpickler(io.BytesIO(_read_bytes(storage.join(uri, CIFAR_META))),
                               encoding="bytes").load()  # fmt: skip
        names = [n.decode() for n in meta[b"label_names"]]
    except FileNotFoundError:
        pass  # the meta file only carries the class names, which CIFAR-10 fixes anyway
    train = ImageSet(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), names
    )
    return train, ImageSet(test_x, test_y, names)


def load_image_folder(
    uri: str, image_size: int = 32, test_fraction: float = 0.2, seed: int = 0
) -> tuple[ImageSet, ImageSet, list[dict]]:
    """<class>/<image> folders, local or s3://, split into train and test stratified by class;
    or train/<class>/.. and test/<class>/.. folders, whose split is kept.

    Files that are not images, lie outside a class folder or do not decode are rejected (kept
    with the reason, as flyray.images has it), not fatal.
    """
    listing = list_images(uri)
    rel = [listing.relative(p) for p in listing.paths]
    presplit = {r[0] for r in rel if len(r) >= 3} >= {"train", "test"}
    fs = storage.filesystem(uri)[0]
    rejects, images, labels, split = list(listing.rejects), [], [], []
    for path, label, parts in zip(listing.paths, listing.labels, rel, strict=True):
        if presplit and (len(parts) < 3 or parts[0] not in ("train", "test")):
            detail = f"{uri} is split: images belong in train/<class>/ or test/<class>/"
            rejects.append(reject(path, label, NO_CLASS_FOLDER, detail))
            continue
        try:
            images.append(_pixels(read_image(fs, path), image_size))
        except (ValueError, OSError) as err:
            rejects.append(reject(path, label, UNDECODABLE, str(err)))
            continue
        labels.append(label)
        split.append(parts[0] if presplit else "")
    if not images:
        raise ImageDataError(f"{uri}: none of {len(listing.paths)} image files decoded")
    names = sorted(set(labels))
    x, y = np.stack(images), np.searchsorted(names, labels).astype(np.int64)
    if presplit:
        is_test = np.asarray(split) == "test"
    else:
        _, test = stratified_split(labels, [test_fraction], seed)
        is_test = np.isin(np.arange(len(y)), test)
    if rejects:
        log.warning("image folder %s: %d files rejected", uri, len(rejects))
    return (
        ImageSet(x[~is_test], y[~is_test], names), ImageSet(x[is_test], y[is_test], names), rejects
    )  # fmt: skip


def _pixels(image, size: int) -> np.ndarray:
    """A PIL image as uint8 (size, size, 3), resized (bilinear, antialiased) when it differs."""
    from PIL import Image

    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, np.uint8)


def to_table(data: ImageSet) -> pa.Table:
    """Images as a fixed_size_list<uint8> column, with shape and class names in the metadata."""
    n, h, w, c = data.images.shape
    flat = pa.array(np.ascontiguousarray(data.images).reshape(-1), pa.uint8())
    meta = {"shape": [h, w, c], "class_names": data.class_names}
    return pa.table(
        {"image": pa.FixedSizeListArray.from_arrays(flat, h * w * c), "label": data.labels},
    ).replace_schema_metadata({METADATA_KEY: json.dumps(meta)})


def from_table(table: pa.Table, shape: tuple[int, int, int] | None = None) -> ImageSet:
    """Inverse of to_table (shape from the metadata unless given: Ray Data drops metadata)."""
    meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    shape = tuple(shape or meta["shape"])
    column = table.column("image").combine_chunks()
    images = column.flatten().to_numpy().reshape((-1, *shape))
    return ImageSet(images, table.column("label").to_numpy().astype(np.int64),
                    meta.get("class_names", []))  # fmt: skip


def write_parquet(data: ImageSet, uri: str) -> str:
    """One parquet file per split (row groups of 1,024 images, so Ray Data can shard it),
    written whole or not at all."""
    storage.write_table(*storage.filesystem(uri), to_table(data), row_group_size=1024)
    return uri


def read_parquet(uri: str) -> ImageSet:
    return from_table(storage.read_table(uri))


@dataclass
class DataSummary:
    """What the runs were given: the data task's typed output, shown in its deck."""

    source: str  # "" for the demo digits
    kind: str
    class_names: list[str]
    image_shape: list[int]
    train_examples: int
    test_examples: int
    train_class_counts: list[int]
    rejected: int  # files that could not be used (image folders), listed in rejects.parquet
    majority_test_accuracy: float  # the most frequent training class predicted for everything
    fingerprint: str = ""  # the source's content (flyray.storage.fingerprint), for lineage


def prepare(
    source: str,
    out_uri: str,
    image_size: int = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_reject_fraction: float = 0.01,
) -> DataSummary:
    """Load a source and write out_uri/train/, out_uri/test/ (parquet) and any rejects.

    More than max_reject_fraction of the files rejected is an error, raised after the rejects
    file is written so that it can be inspected.
    """  # fmt: skip
    loaded = load_images(source, image_size, test_fraction, seed)
    if loaded.rejects:
        fs, path = storage.filesystem(storage.join(out_uri, "rejects.parquet"))
        storage.write_table(fs, path, pa.Table.from_pylist(loaded.rejects, schema=REJECTS_SCHEMA))
        seen = len(loaded.rejects) + len(loaded.train) + len(loaded.test)
        if len(loaded.rejects) > max_reject_fraction * seen:
            raise ImageDataError(
                f"{source}: {len(loaded.rejects)} of {seen} files rejected (more than "
                f"{max_reject_fraction:.0%}); see {storage.join(out_uri, 'rejects.parquet')}"
            )
    write_parquet(loaded.train, storage.join(out_uri, "train", "part-0.parquet"))
    write_parquet(loaded.test, storage.join(out_uri, "test", "part-0.parquet"))
    counts = np.bincount(loaded.train.labels, minlength=len(loaded.train.class_names))
    majority = int(np.argmax(counts))
    return DataSummary(
        source=source, kind=loaded.kind, class_names=loaded.train.class_names,
        image_shape=list(loaded.train.images.shape[1:]), train_examples=len(loaded.train),
        test_examples=len(loaded.test), train_class_counts=counts.tolist(),
        rejected=len(loaded.rejects),
        majority_test_accuracy=float(np.mean(loaded.test.labels == majority)),
    )  # fmt: skip
