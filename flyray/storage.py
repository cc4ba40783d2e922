"""Filesystem access for local paths and s3:// URIs (AWS or an S3-compatible server such as MinIO).

One place decides how a URI becomes a pyarrow filesystem, so every step (ingest, features,
checkpoints) reads and writes local and object storage the same way.

Configuration (environment, never code):
  FLYRAY_S3_ENDPOINT_URL or AWS_ENDPOINT_URL   endpoint override, e.g. http://minio:9000
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY    credentials (AWS_SESSION_TOKEN optional)
  AWS_REGION or AWS_DEFAULT_REGION             region (default us-east-1)
Inside a Flyte task, the tasks layer copies Flyte secrets into these variables first.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

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


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    if is_s3(uri):
        return s3_filesystem(), uri[len(S3_PREFIX) :]
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    return S3_PREFIX + path if isinstance(fs, pafs.S3FileSystem) else path


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if is_s3(uri) else os.path.join(uri, *parts)


SUCCESS = "_SUCCESS"  # Hadoop's marker of a complete output directory


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a file so that readers see all of it or none: a local file is written beside and
    renamed into place; an S3 object only appears when its upload completes."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as fh:
            fh.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as fh:
            fh.write(data)


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
    """A digest that changes whenever the content changes, not only the path.

    Local files are hashed in full (sha256, one thread per file; about 1 s per GB here). Object
    stores rewrite an object's size or Last-Modified on every PUT, so those stand for content.
    """
    local = [f.path for f in files if not is_s3(f.path)]
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(local)))) as pool:
        digests = dict(zip(local, pool.map(_sha256, local), strict=True))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\0{f.size}\0{digests.get(f.path) or f.mtime_ns}\n".encode())
    return h.hexdigest()
