"""Filesystem access for local paths and s3:// URIs (AWS or an S3-compatible server such as MinIO).

One place decides how a URI becomes a pyarrow filesystem, so every step (ingest, features,
checkpoints) reads and writes local and object storage the same way. Every file that a later
step trusts is written whole or not at all (atomic_output, write_atomic, write_table), and a
folder of them is trusted only when its verifiable _SUCCESS marker says so (mark_complete,
is_complete).

Configuration (environment, never code):
  FLYRAY_S3_ENDPOINT_URL or AWS_ENDPOINT_URL   endpoint override, e.g. http://minio:9000
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY    credentials (AWS_SESSION_TOKEN optional)
  AWS_REGION or AWS_DEFAULT_REGION             region (default us-east-1)
Inside a Flyte task, Flyte mounts the S3 secrets as these variables (tasks/platform.py's
storage_secrets).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

S3_PREFIX = "s3://"


@dataclass(frozen=True)
class InputFile:
    """A file matched by an input spec, with what the planner and the cache key need."""

    path: str  # URI as the user would write it (local absolute path or s3://bucket/key)
    size: int
    mtime_ns: int


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_PREFIX)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem from the environment; credentials are read, never logged."""
    endpoint = os.environ.get("FLYRAY_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    # Throttling (503 SlowDown) and dropped connections are retried with backoff by the client;
    # an outage longer than that fails the task as transient, for Flyte to retry.
    return _S3FileSystem(int(os.environ.get("FLYRAY_S3_MAX_ATTEMPTS", "6")), **kwargs)


class _S3FileSystem(pafs.S3FileSystem):
    """S3FileSystem with a retry strategy that survives pickling: pyarrow's own pickles every
    option but `retry_strategy`, so a Ray task handed the filesystem fell back to 3 attempts."""

    def __init__(self, attempts: int, **kwargs) -> None:
        retry = pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)
        super().__init__(retry_strategy=retry, **kwargs)
        self._attempts, self._kwargs = attempts, kwargs

    def __reduce__(self):
        return _rebuild_s3, (self._attempts, self._kwargs)


def _rebuild_s3(attempts: int, kwargs: dict) -> _S3FileSystem:
    return _S3FileSystem(attempts, **kwargs)


def _path(uri: str) -> str:
    return uri[len(S3_PREFIX) :] if is_s3(uri) else str(Path(uri).expanduser().absolute())


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    return (s3_filesystem() if is_s3(uri) else pafs.LocalFileSystem()), _path(uri)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    return S3_PREFIX + path if isinstance(fs, pafs.S3FileSystem) else path


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if is_s3(uri) else os.path.join(uri, *parts)


SUCCESS = "_SUCCESS"  # Hadoop's marker of a complete output directory


def _hidden(name: str) -> bool:
    """Names that readers skip (pyarrow datasets, list_input_files): markers, staging files."""
    return name.startswith((".", "_"))


@contextmanager
def atomic_output(fs: pafs.FileSystem, path: str) -> Iterator[pa.NativeFile]:
    """A stream for `path` whose file appears only when the block ends without error, so that
    readers see all of it or none. Local files are written beside, hidden, and renamed into
    place; S3 objects are staged in a local file and uploaded whole (an S3 stream closed after
    an error would still publish what it had)."""
    parent, name = posixpath.split(path)
    local = isinstance(fs, pafs.LocalFileSystem)
    staging_fs = fs if local else pafs.LocalFileSystem()
    staging = f"{parent if local else tempfile.gettempdir()}/.{name}.{uuid.uuid4().hex}.tmp"
    if local:
        fs.create_dir(parent, recursive=True)
    try:
        with staging_fs.open_output_stream(staging) as fh:
            yield fh
        if local:
            fs.move(staging, path)
        else:
            pafs.copy_files(staging, path, source_filesystem=staging_fs, destination_filesystem=fs)
    finally:
        if staging_fs.get_file_info(staging).type == pafs.FileType.File:
            staging_fs.delete_file(staging)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a file that readers see whole or not at all (see atomic_output)."""
    with atomic_output(fs, path) as fh:
        fh.write(data)


def write_table(fs: pafs.FileSystem, path: str, table: pa.Table, **kwargs) -> None:
    """One parquet file, written atomically; `kwargs` go to pyarrow.parquet.write_table."""
    with atomic_output(fs, path) as fh:
        pq.write_table(table, fh, **kwargs)


def read_table(
    uri: str,
    columns: list[str] | None = None,
    filters: list | None = None,
    fs: pafs.FileSystem | None = None,
) -> pa.Table:
    """A parquet file or directory (local or s3://) as one table. `fs` replaces the filesystem
    built from the environment: a Ray worker is handed the driver's, as it may lack the
    driver's storage settings."""
    return pq.read_table(
        _path(uri), filesystem=fs or filesystem(uri)[0], columns=columns, filters=filters
    )


def _listing(fs: pafs.FileSystem, folder: str) -> dict[str, int]:
    """Size of every file under `folder` that readers see, by path relative to it."""
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    return {
        posixpath.relpath(i.path, folder): i.size
        for i in infos
        if i.type == pafs.FileType.File
        and not any(_hidden(part) for part in posixpath.relpath(i.path, folder).split("/"))
    }


def _digest(files: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def mark_complete(uri: str) -> None:
    """Write `uri`/_SUCCESS, last: the list of the folder's files with their sizes and a digest
    of that list, so that a reader can tell a complete folder from one that was cut short, had
    files added or lost since, or whose marker is itself damaged (see is_complete)."""
    fs, folder = filesystem(uri)
    files = _listing(fs, folder)
    marker = {"files": files, "sha256": _digest(files)}
    write_atomic(fs, f"{folder}/{SUCCESS}", json.dumps(marker, indent=1).encode())


def is_complete(uri: str) -> bool:
    """True if `uri` holds a _SUCCESS marker that parses, matches its digest, and lists exactly
    the files the folder has, at their sizes. A missing, truncated or garbled marker is the
    same as none: the output is not trusted and gets rebuilt."""
    fs, folder = filesystem(uri)
    try:
        with fs.open_input_stream(f"{folder}/{SUCCESS}") as fh:
            marker = json.loads(fh.read())
        files = marker["files"]
        valid = marker["sha256"] == _digest(files)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False
    return valid and files == _listing(fs, folder)


def list_input_files(spec: str, suffixes: tuple[str, ...]) -> list[InputFile]:
    """Files named by a file, a directory (recursive) or a glob, sorted by path.

    Raises FileNotFoundError naming the spec when nothing matches, so a typo never reaches Ray.
    """
    fs, path = filesystem(spec)
    has_glob = any(ch in path for ch in "*?[")
    base = path.split("*")[0].split("?")[0].split("[")[0].rstrip("/") if has_glob else path
    if has_glob:
        base = posixpath.dirname(base) if not base.endswith("/") else base
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {spec}")
    if info.type == pafs.FileType.File and not has_glob:
        infos = [info]
    else:
        selector = pafs.FileSelector(base, recursive=True)
        infos = [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
        if has_glob:
            infos = [i for i in infos if fnmatch.fnmatch(i.path, path)]
        else:
            infos = [i for i in infos if i.base_name.lower().endswith(suffixes)]
            infos = [i for i in infos if not i.base_name.startswith((".", "_"))]
    if not infos:
        raise FileNotFoundError(
            f"no input files in {spec} (looked for {', '.join(suffixes)})"
            if not has_glob
            else f"no files match {spec}"
        )
    return sorted(
        (InputFile(to_uri(fs, i.path), i.size, i.mtime_ns or 0) for i in infos),
        key=lambda f: f.path,
    )


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fingerprint(files: list[InputFile]) -> str:
    """A digest of the content: each file's name relative to the files' common folder, its
    size and its bytes, so the same files anywhere (a copy, demo data generated again from its
    seed) have the same digest and any change of content has another (flyray.lineage).

    Local files are hashed in full (sha256, one thread per file; about 1 s per GB here). Object
    stores rewrite an object's size or Last-Modified on every PUT, so those stand for content.
    """
    if not files:
        raise ValueError("fingerprint: no files")
    local = [f.path for f in files if not is_s3(f.path)]
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(local)))) as pool:
        digests = dict(zip(local, pool.map(_sha256, local), strict=True))
    paths = [f.path for f in files]
    base = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
    h = hashlib.sha256()
    for f in files:
        name = posixpath.relpath(f.path, base)
        h.update(f"{name}\0{f.size}\0{digests.get(f.path) or f.mtime_ns}\n".encode())
    return h.hexdigest()
