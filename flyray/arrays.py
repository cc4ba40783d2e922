"""Small vectorised array helpers shared by the data and model code."""

from __future__ import annotations

import numpy as np


def segment_ranges(lengths: np.ndarray) -> np.ndarray:
    """0..len-1 for each length, concatenated: the offsets inside consecutive segments."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    starts = np.cumsum(lengths) - lengths
    return np.arange(total) - np.repeat(starts, lengths)
