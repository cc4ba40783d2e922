"""The CLIP classifier's splits of an embedded image set (flyray.images lists and decodes it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from flyray.images import stratified_split


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
    from sklearn.preprocessing import LabelEncoder

    labels = np.asarray(table["label"].to_pylist(), dtype=object)
    parts = stratified_split(labels, [validation_fraction, test_fraction], seed, min_per_class)
    encoder = LabelEncoder().fit(labels[parts[0]])

    def part(rows: np.ndarray) -> pa.Table:
        idx = encoder.transform(labels[rows]).astype(np.int64)
        return table.take(pa.array(rows)).append_column("label_idx", pa.array(idx))

    return Splits(*(part(p) for p in parts), [str(c) for c in encoder.classes_])
