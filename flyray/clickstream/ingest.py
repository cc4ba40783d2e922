"""Distributed clickstream ingest on Ray.

Ray Data's `read_json(lines=True)` reads through pandas, one file per task, and each Ray Data
execution costs about 2-3 s of fixed start-up on a fresh cluster; measured here, either alone
kept the Ray path behind one pyarrow process. So ingest cuts every file into line-aligned byte
ranges and runs one plain Ray task per range: it parses with pyarrow's C++ readers, validates
with vectorised compute, and writes its events as parquet hash-partitioned by user
(events/bucket=K/part-BLOCK.parquet), so the feature step finds each user's whole history in one
bucket without a shuffle. The driver keeps at most two tasks per CPU in flight (memory stays
bounded at any input size), logs progress, and turns each task's block-relative reject line
numbers into absolute ones. Every file is read through its Layout (layouts.py), chosen by the
config or recognised from the file's first line, so any layout takes this same path.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from flyray import console, storage
from flyray.clickstream.config import IngestConfig
from flyray.clickstream.layouts import PRESETS, Layout, detect, first_line, layout_for, resolve
from flyray.clickstream.parse import Limits, parse_block
from flyray.clickstream.reports import IngestReport
from flyray.clickstream.schema import (
    COMPRESSION,
    EVENT_TYPES,
    INPUT_SUFFIXES,
    REJECT_REASONS,
    REJECTS_SCHEMA,
    IngestError,
)
from flyray.raytrain import require_ray

log = logging.getLogger(__name__)
_EXTEND = 1 << 20  # bytes read past a range's end to finish its last line


@dataclass(frozen=True)
class BlockSpec:
    block_id: int
    path: str  # path inside `fs`
    source: str  # URI as the user gave it, for messages and the rejects file
    layout: Layout  # resolved against this file (layouts.resolve)
    start: int
    end: int
    size: int
    codec: str  # pyarrow's compression codec ("" for plain text): the file is streamed


def bucket_of(user_ids: np.ndarray, n_buckets: int) -> np.ndarray:
    """Stable user -> bucket hash (Fibonacci hashing), identical on every worker and run."""
    mixed = user_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(n_buckets)).astype(np.int32)


@dataclass(frozen=True)
class Bounds:
    """What one read task may take in: its chunk of text, one line, a file's expanded size."""

    chunk_bytes: int
    limits: Limits
    max_expanded_bytes: int

    @classmethod
    def of(cls, config: IngestConfig) -> Bounds:
        limits = Limits(config.max_line_kb << 10, config.max_depth)
        return cls(_block_bytes(config), limits, int(config.max_expanded_gb * (1 << 30)))


def _read_range(fs: pafs.FileSystem, spec: BlockSpec, max_line: int) -> bytes:
    """The whole lines that start inside [start, end) of a plain file; the last one read at most
    `max_line` bytes past the end (a longer line is rejected as too long, not read whole)."""
    with fs.open_input_file(spec.path) as fh:
        begin = max(spec.start - 1, 0)
        data = fh.read_at(spec.end - begin, begin)
        if spec.start > 0:  # the line that starts before our range belongs to the previous one
            cut = data.find(b"\n")
            if cut < 0 or begin + cut + 1 >= spec.end:
                return b""
            data = data[cut + 1 :]
        pos, tail = spec.end, []
        while not data.endswith(b"\n") and pos < spec.size and not (tail and b"\n" in tail[-1]):
            if pos - spec.end > max_line:
                break
            chunk = fh.read_at(min(_EXTEND, spec.size - pos), pos)
            pos += len(chunk)
            tail.append(chunk)
        if tail:
            joined = b"".join(tail)
            cut = joined.find(b"\n")
            data += joined if cut < 0 else joined[: cut + 1]
        return data


def _expanded_chunks(fh, source: str, bounds: Bounds):
    """Whole lines of a decompressing stream, about `chunk_bytes` at a time, in bounded memory: a
    line longer than the limit is cut there (its rest skipped, so line numbers hold) and the
    screen rejects it; past `max_expanded_bytes` the file fails, named."""
    carry, total, skipping, max_line = b"", 0, False, bounds.limits.max_line_bytes
    while data := fh.read(bounds.chunk_bytes):
        total += len(data)
        if total > bounds.max_expanded_bytes:
            raise IngestError(
                f"{source}: expands past {bounds.max_expanded_bytes / (1 << 30):g} GB "
                "(ingest_config.max_expanded_gb); a decompression bomb, or raise the bound"
            )
        if skipping:  # the rest of a line already cut and rejected
            cut = data.find(b"\n")
            if cut < 0:
                continue
            data, skipping = data[cut + 1 :], False
        data = carry + data
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        if len(carry) > max_line:
            data, carry, skipping = data[:cut] + carry[: max_line + 1] + b"\n", b"", True
        else:
            data = data[:cut]
        if data:
            yield data
    if carry:
        yield carry


def _read_chunks(fs: pafs.FileSystem, spec: BlockSpec, bounds: Bounds):
    """A block's text in chunks: a plain file's byte range at once, a compressed file streamed."""
    try:
        if not spec.codec:
            yield _read_range(fs, spec, bounds.limits.max_line_bytes)
            return
        with fs.open_input_stream(spec.path, compression=spec.codec) as fh:
            yield from _expanded_chunks(fh, spec.source, bounds)
    except OSError as exc:
        if not spec.codec or "NETWORK" in str(exc) or "curlCode" in str(exc):
            raise  # a storage failure, not bad input
        raise IngestError(
            f"{storage.to_uri(fs, spec.path)}: not a readable {spec.codec} file ({exc})"
        ) from None


def _rejects_table(spec: BlockSpec, result) -> pa.Table:
    return pa.table(
        {
            "source": [spec.source] * result.n_rejects,
            "line": result.reject_lines,
            "reason": result.reject_reasons,
            "field": result.reject_fields,
            "detail": result.reject_details,
            "raw": result.reject_raw,
        },
        schema=REJECTS_SCHEMA,
    )


def _write_buckets(
    fs: pafs.FileSystem, events: pa.Table, n_buckets: int, events_dir: str, part: str
) -> None:
    buckets = bucket_of(events["user_id"].to_numpy(), n_buckets)
    order = np.argsort(buckets, kind="stable")
    events = events.take(pa.array(order))
    bounds = np.searchsorted(buckets[order], np.arange(n_buckets + 1))
    for k in range(n_buckets):
        if bounds[k + 1] > bounds[k]:
            rows = events.slice(bounds[k], bounds[k + 1] - bounds[k])
            storage.write_table(fs, f"{events_dir}/bucket={k}/part-{part}.parquet", rows)


@ray.remote(max_retries=3)
def _ingest_block(
    fs: pafs.FileSystem,
    out_fs: pafs.FileSystem,
    spec: BlockSpec,
    n_buckets: int,
    events_dir: str,
    user_key: str,
    bounds: Bounds,
) -> tuple[dict, pa.Table | None]:
    """Parse, validate and write one block (a compressed file: chunk by chunk); return its
    counts and its rejects, their line numbers counted from the block's start.

    Output file names depend only on the block and chunk, so a retried task overwrites, never
    duplicates.
    """
    counts = {"lines": 0, "events": 0, "events_by_type": np.zeros(len(EVENT_TYPES), np.int64),
              "rejects_by_reason": Counter(), "session_users": 0}  # fmt: skip
    rejects = []
    for chunk, data in enumerate(_read_chunks(fs, spec, bounds)):
        layout = spec.layout
        header = layout.format == "csv" and layout.header and spec.start == 0 and chunk == 0
        result = parse_block(
            data, layout, has_header=header, user_key=user_key, limits=bounds.limits
        )
        part = f"{spec.block_id:06d}-{chunk:05d}"
        _write_buckets(out_fs, result.events, n_buckets, events_dir, part)
        if result.n_rejects:
            table = _rejects_table(spec, result)
            line = pa.array(table["line"].to_numpy() + counts["lines"])
            rejects.append(table.set_column(table.schema.get_field_index("line"), "line", line))
        counts["lines"] += data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        counts["events"] += result.events.num_rows
        codes = result.events["event_code"].to_numpy()
        counts["events_by_type"] += np.bincount(codes, minlength=len(EVENT_TYPES))
        counts["rejects_by_reason"].update(result.reject_reasons)
        counts["session_users"] += result.session_users
    counts["events_by_type"] = counts["events_by_type"].tolist()
    counts["rejects_by_reason"] = dict(counts["rejects_by_reason"])
    return counts, (pa.concat_tables(rejects) if rejects else None)


# Byte-order marks of the encodings a UTF-8 reader must not guess at.
_BOMS = {b"\xff\xfe\x00\x00": "UTF-32 (little-endian)", b"\x00\x00\xfe\xff": "UTF-32 (big-endian)",
         b"\xff\xfe": "UTF-16 (little-endian)", b"\xfe\xff": "UTF-16 (big-endian)"}  # fmt: skip


def _encoding_error(head: bytes) -> str:
    """Why the start of a file is not UTF-8 text ("" when it may be)."""
    name = next((n for bom, n in _BOMS.items() if head.startswith(bom)), "")
    if not name and head[:1024].count(b"\x00") > len(head[:1024]) // 4:  # no BOM, ASCII as UTF-16
        name = "UTF-16 (no byte-order mark)"
    if not name:
        return ""
    return (
        f"the file is {name} text; flyray reads UTF-8 (convert it first, e.g. "
        "`iconv -f UTF-16 -t UTF-8 in > out`)"
    )


def _first_line(fs: pafs.FileSystem, path: str, source: str, codec: str) -> bytes:
    opener = fs.open_input_stream
    with opener(path, compression=codec) if codec else opener(path) as fh:
        head = fh.read(1 << 16)
    why = _encoding_error(head)
    if why:
        raise IngestError(f"{source}: {why}")
    return first_line(head)


def _file_layout(
    fs: pafs.FileSystem, path: str, source: str, codec: str, config: IngestConfig
) -> tuple[Layout, str]:
    """This file's layout, resolved against its first line, and why it was chosen."""
    chosen = layout_for(config.layout, config.custom_layout)
    try:
        line = _first_line(fs, path, source, codec)
    except OSError as exc:
        if not codec or "NETWORK" in str(exc) or "curlCode" in str(exc):
            raise
        raise IngestError(f"{source}: not a readable {codec} file ({exc})") from None
    if not line:  # nothing but blank lines: no records under any layout
        return chosen or PRESETS["jsonl"], "the file starts with blank lines only"
    if chosen is None:
        chosen, why = detect(line, source)
    elif config.custom_layout is not None:
        why = "ingest_config.custom_layout"
    else:
        why = f"ingest_config.layout is {config.layout!r}"
    return resolve(chosen, line, source), why


def plan_blocks(
    spec: str, block_bytes: int, config: IngestConfig | None = None
) -> tuple[pafs.FileSystem, list[BlockSpec], list[str], dict[str, tuple[str, str]]]:
    """Resolve the input spec, choose each file's layout and cut its files into line-aligned
    byte ranges.

    Returns the filesystem, the blocks, the empty files (skipped, but reported) and each file's
    (layout name, why).
    """
    config = config or IngestConfig()
    files = storage.list_input_files(spec, INPUT_SUFFIXES)
    fs, _ = storage.filesystem(spec)
    blocks: list[BlockSpec] = []
    empty: list[str] = []
    layouts: dict[str, tuple[str, str]] = {}
    for f in files:
        if f.size == 0:
            empty.append(f.path)
            continue
        path = storage.filesystem(f.path)[1]
        codec = next((c for x, c in COMPRESSION.items() if f.path.lower().endswith(x)), "")
        layout, why = _file_layout(fs, path, f.path, codec, config)
        layouts[f.path] = (layout.name, why)
        ranges = (
            [(0, f.size)]  # one task streams the file (a compressed file has no byte ranges)
            if codec
            else [(s, min(s + block_bytes, f.size)) for s in range(0, f.size, block_bytes)]
        )
        for start, end in ranges:
            blocks.append(BlockSpec(len(blocks), path, f.path, layout, start, end, f.size, codec))
    if not blocks:
        raise IngestError(f"input is empty: {spec} ({len(empty)} empty file(s): {empty[:5]})")
    return fs, blocks, empty, layouts


def _describe_layouts(layouts: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(layout, why) for the report: one name, or each name with its file count."""
    by_name: dict[str, list[str]] = {}
    for name, why in layouts.values():
        by_name.setdefault(name, []).append(why)
    if len(by_name) == 1:
        [(name, whys)] = by_name.items()
        return name, whys[0]
    names = ", ".join(by_name)
    return names, "; ".join(f"{n} ({len(w)} file(s)): {w[0]}" for n, w in by_name.items())


def _run_blocks(
    fs: pafs.FileSystem,
    out_fs: pafs.FileSystem,
    blocks: list[BlockSpec],
    n_buckets: int,
    events_dir: str,
    user_key: str,
    bounds: Bounds,
) -> list[tuple[dict, pa.Table | None]]:
    """Run every block with a bounded number in flight; a progress bar, and a log line every
    few seconds."""
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending: dict = {}
    results: dict[int, tuple[dict, pa.Table | None]] = {}
    todo = list(blocks)
    began = last_log = time.perf_counter()
    bar = console.progress(total=len(blocks), desc="ingest", unit="block")
    while todo or pending:
        while todo and len(pending) < window:
            spec = todo.pop(0)
            ref = _ingest_block.remote(fs, out_fs, spec, n_buckets, events_dir, user_key, bounds)
            pending[ref] = spec
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            try:
                results[pending.pop(ref).block_id] = ray.get(ref)
                bar.update()
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, IngestError):  # its own message, not Ray's traceback
                    raise err.cause from None
                raise
        if time.perf_counter() - last_log > 5 or not (todo or pending):
            last_log = time.perf_counter()
            events = sum(r[0]["events"] for r in results.values())
            log.info(
                "ingest: %d/%d blocks, %d events, %.0f events/s",
                len(results),
                len(blocks),
                events,
                events / max(last_log - began, 1e-9),
            )
    bar.close()
    return [results[spec.block_id] for spec in blocks]


def _write_rejects(
    out_fs: pafs.FileSystem,
    rejects_path: str,
    blocks: list[BlockSpec],
    results: list[tuple[dict, pa.Table | None]],
) -> None:
    """One rejects file, with 1-based line numbers counted from the start of each file."""
    lines_before: dict[str, int] = {}
    parts = []
    for spec, (counts, rejects) in zip(blocks, results, strict=True):  # in file, offset order
        offset = lines_before.get(spec.source, 0)
        lines_before[spec.source] = offset + counts["lines"]
        if rejects is not None:
            line = pa.array(rejects["line"].to_numpy() + offset + 1)
            parts.append(rejects.set_column(rejects.schema.get_field_index("line"), "line", line))
    table = pa.concat_tables(parts) if parts else REJECTS_SCHEMA.empty_table()
    storage.write_table(out_fs, rejects_path, table)


def _block_bytes(config: IngestConfig) -> int:
    if config.block_mb < 1:
        raise ValueError(f"block_mb must be >= 1, got {config.block_mb}")
    return config.block_mb << 20


def ingest(source: str, output_uri: str, config: IngestConfig | None = None) -> IngestReport:
    """Read, validate and bucket clickstream events from `source` into `output_uri`.

    Writes events/bucket=K/*.parquet, rejects.parquet and ingest_report.json. Raises IngestError
    for a missing or empty input, or when the reject fraction exceeds the configured maximum;
    the rejects file is written before that, so nothing is lost.
    """
    config = config or IngestConfig()
    began = time.perf_counter()
    fs, blocks, empty, layouts = plan_blocks(source, _block_bytes(config), config)
    layout, layout_reason = _describe_layouts(layouts)
    out_fs, out_path = storage.filesystem(output_uri)
    out_fs.delete_dir_contents(out_path, missing_dir_ok=True)  # a re-run must not append
    events_path = f"{out_path}/events"
    out_fs.create_dir(events_path, recursive=True)
    log.info(
        "ingest %s: %d file(s), %d block(s), layout %s (%s)",
        source,
        len(layouts),
        len(blocks),
        layout,
        layout_reason,
    )
    require_ray()
    bounds = Bounds.of(config)
    results = _run_blocks(
        fs, out_fs, blocks, config.n_buckets, events_path, config.user_key, bounds
    )
    rejects_uri = storage.to_uri(out_fs, f"{out_path}/rejects.parquet")
    _write_rejects(out_fs, f"{out_path}/rejects.parquet", blocks, results)
    manifests = [counts for counts, _ in results]
    n_events = sum(m["events"] for m in manifests)
    by_reason = Counter()
    by_type = np.zeros(len(EVENT_TYPES), dtype=np.int64)
    for m in manifests:
        by_reason.update(m["rejects_by_reason"])
        by_type += np.array(m["events_by_type"])
    n_rejects = sum(by_reason.values())
    total = n_events + n_rejects
    report = IngestReport(
        source=source,
        files=len({b.source for b in blocks}) + len(empty),
        bytes=sum(b.end - b.start for b in blocks),
        blocks=len(blocks),
        events=n_events,
        rejects=n_rejects,
        reject_fraction=n_rejects / total if total else 0.0,
        rejects_by_reason={r: by_reason.get(r, 0) for r in REJECT_REASONS},
        events_by_type=dict(zip(EVENT_TYPES, by_type.tolist(), strict=True)),
        seconds=time.perf_counter() - began,
        events_uri=storage.to_uri(out_fs, events_path),
        rejects_uri=rejects_uri,
        empty_files=empty,
        layout=layout,
        layout_reason=layout_reason,
        user_key=config.user_key,
        session_users=sum(m["session_users"] for m in manifests),
    )
    storage.write_atomic(
        out_fs, f"{out_path}/ingest_report.json", json.dumps(asdict(report), indent=2).encode()
    )
    _check(report, config.max_reject_fraction)
    # Last: only a finished, accepted ingest is marked complete (features refuse any other).
    storage.mark_complete(report.events_uri)
    log.info(
        "ingest done: %d events (%d with the session as user), %d rejects in %.1fs",
        n_events,
        report.session_users,
        n_rejects,
        report.seconds,
    )
    return report


def _check(report: IngestReport, max_fraction: float) -> None:
    counts = ", ".join(f"{r}={n}" for r, n in report.rejects_by_reason.items() if n)
    if report.events + report.rejects == 0:
        raise IngestError(f"no records in {report.source}: every line is blank")
    if report.events == 0:
        raise IngestError(
            f"every one of {report.rejects} records in {report.source} was rejected ({counts}); "
            f"see {report.rejects_uri}"
        )
    if report.reject_fraction > max_fraction:
        raise IngestError(
            f"{report.rejects} of {report.events + report.rejects} records rejected "
            f"({report.reject_fraction:.2%} > max_reject_fraction {max_fraction:.2%}): {counts}; "
            f"rejected records with file and line are in {report.rejects_uri}"
        )
