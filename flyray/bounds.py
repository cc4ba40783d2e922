"""Bounds on hostile input shared by ingest and serving (docs/layouts.md#limits,
docs/serving.md#limits): what no parser or decoder is handed beyond."""

from __future__ import annotations

import re

import numpy as np

# A JSON string, escapes included, or an unclosed one to the end: every quote that starts a
# match ends it, and nothing backtracks (possessive), so one pass is linear in the input.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.S)
_BRACKETS = np.zeros(256, dtype=np.int8)
_BRACKETS[[ord("{"), ord("[")]] = 1
_BRACKETS[[ord("}"), ord("]")]] = -1


def json_depth(data: bytes) -> int:
    """How deep JSON text nests (objects and arrays), brackets inside strings not counted.
    Written out because Python's json parser recurses (RecursionError, or a crash in a C parser)
    on the very input this guards against: strings are blanked by one regex pass, then the
    depth is a running sum over the bytes left."""
    if data.count(b"[") + data.count(b"{") == 0:
        return 0
    bare = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    return int(np.cumsum(_BRACKETS[bare], dtype=np.int32).max(initial=0))


def image_size_error(size: tuple[int, int], max_pixels: int) -> str:
    """Why an image of `size` (width, height, from its header) is not decoded ("" when it may
    be): decoded RGB takes 3 bytes a pixel, so a 20 KB PNG can claim half a gigabyte."""
    width, height = size
    if width * height <= max_pixels:
        return ""
    return f"{width}x{height} pixels, over the limit of {max_pixels:,} (decoded before any check)"
