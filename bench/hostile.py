"""Hostile inputs against their bounds: what each ends in and the memory it took.

    python -m bench.hostile        # prints the table, writes bench/results/hostile.json

Each input goes through the code that meets it in production (an ingest task's chunking and
parsing, the serving routes' checks), in this process, and its peak is what tracemalloc saw
allocated on top of the input itself. No Ray and no server: tests/test_bad_inputs.py and
tests/test_serve.py run the same inputs through the Ray ingest and a live Ray Serve.
"""

from __future__ import annotations

import gzip
import io
import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from PIL import Image

from flyray.bounds import json_depth
from flyray.clickstream.config import IngestConfig
from flyray.clickstream.ingest import Bounds, _encoding_error, _expanded_chunks
from flyray.clickstream.parse import parse_block
from flyray.clickstream.schema import IngestError
from flyray.serve import models

OK = b'{"user_id": 1, "item_id": 2, "event_type": "view", "timestamp": 1700000000}'
OUT = Path(__file__).resolve().parent / "results" / "hostile.json"


def _ingest(data: bytes, codec: str = "", config: IngestConfig | None = None) -> str:
    """What an ingest task does with one file's bytes: stream-expand, parse, count rejects."""
    bounds = Bounds.of(config or IngestConfig())
    events, rejects = 0, {}
    try:
        chunks = [data]
        if codec:
            stream = pa.input_stream(pa.py_buffer(data), compression=codec)
            chunks = _expanded_chunks(stream, "hostile", bounds)
        for chunk in chunks:
            result = parse_block(chunk, "jsonl", limits=bounds.limits)
            events += result.events.num_rows
            for reason in result.reject_reasons:
                rejects[reason] = rejects.get(reason, 0) + 1
    except IngestError as err:
        return f"error: {str(err)[:70]}"
    return f"{events} events kept, rejected {rejects}"


def _serve(check: Callable[[], object]) -> str:
    try:
        check()
    except models.BadRequest as err:
        return f"{err.status} {err.field}: {err.body()['error'][len(err.field) + 2 :][:60]}"
    return "accepted"


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, "PNG")
    return out.getvalue()


def cases() -> list[tuple[str, int, Callable[[], str]]]:
    deep = b'{"user_id": 1, "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    long_line = b'{"pad": "' + b"y" * 100_000_000 + b'"}'
    lines = pa.compress(OK + b"\n" + long_line + b"\n" + OK + b"\n", codec="zstd", asbytes=True)
    bomb = gzip.compress(b"\n" * 300_000_000, compresslevel=9)  # 300 MB of blank lines
    utf16 = (OK + b"\n").decode().encode("utf-16")
    body = b'{"user_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    png = _png(13_000, 13_000)
    return [
        ("JSON record nested 20,000 deep", len(deep),
         lambda: _ingest(OK + b"\n" + deep + b"\n" + OK + b"\n")),
        ("100 MB line in a zstd stream", len(lines), lambda: _ingest(lines, "zstd")),
        ("gzip expanding to 300 MB (bound 0.1 GB)", len(bomb),
         lambda: _ingest(bomb, "gzip", IngestConfig(max_expanded_gb=0.1))),
        ("UTF-16 file", len(utf16), lambda: "error: " + _encoding_error(utf16)[:60]),
        ("request nested 100,000 deep", len(body),
         lambda: f"400 body: nested {json_depth(body):,} deep (limit {models.MAX_JSON_DEPTH})"),
        ("13,000 x 13,000 PNG (507 MB as RGB)", len(png),
         lambda: _serve(lambda: models.decode_images([png]))),
        ("/recommend 1,000 users x n 1,000", 0,
         lambda: _serve(lambda: models.Recommender.parse_recommend(
             {"user_ids": list(range(1000)), "n": 1000}))),
    ]  # fmt: skip


def main() -> None:
    rows = []
    for name, size, run in cases():
        tracemalloc.start()
        outcome = run()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append({"input": name, "bytes": size, "outcome": outcome, "peak_mb": peak / 1e6})
        print(f"{name:<42} {size / 1e6:>9.2f} MB  peak {peak / 1e6:>7.1f} MB  {outcome}",
              flush=True)  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
