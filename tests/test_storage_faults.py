"""Storage faults on a real S3 server: errors mid-read and mid-write are retried, an outage mid-run fails
cleanly (transient, nothing marked complete), and the next run succeeds with no duplicates.

Faults come from a small HTTP proxy in front of the moto server that answers chosen requests
with 503 SlowDown (hand-written: no library injects S3 faults into a real server's traffic)."""

from __future__ import annotations

import http.client
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from flyray import storage
from flyray.clickstream.config import IngestConfig
from flyray.clickstream.features import FeatureError, build_features
from flyray.clickstream.generate import GeneratorConfig, generate
from flyray.clickstream.ingest import ingest
from tasks.retries import is_transient
from tests.background import stop_group
from tests.conftest import _free_port, serve

SLOW_DOWN = (
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)

# Every test here but one or two runs on Ray: the session's local Ray for the module.
pytestmark = pytest.mark.usefixtures("ray_cluster")


class FaultyProxy:
    """Forwards S3 requests to `upstream`; `fail(method, path, n)` picks requests (n: how often
    this method and path were asked before) to answer with 503 SlowDown instead."""

    def __init__(self, upstream_port: int, fail):
        self.injected = 0
        self.counts: dict[tuple[str, str], int] = {}
        proxy = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                body = self._body()
                with lock:
                    key = (self.command, self.path)
                    n = proxy.counts[key] = proxy.counts.get(key, 0) + 1
                    inject = fail(self.command, self.path, n - 1)
                    proxy.injected += inject
                if inject:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "expect", "transfer-encoding")}  # fmt: skip
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but the length of the object's
                length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _body(self) -> bytes | None:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def moto_port():
    port = _free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = serve(cmd, port, f"http://127.0.0.1:{port}")
    yield port, proc
    stop_group(proc)


@pytest.fixture(scope="module")
def events_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "events.jsonl"
    summary = generate(path, GeneratorConfig(n_events=200_000, seed=11))
    return path, summary


def _env(monkeypatch, endpoint: str) -> None:
    monkeypatch.setenv("FLYRAY_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")


def _bucket(port: int, name: str, events_file=None) -> None:
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                      aws_access_key_id="k", aws_secret_access_key="s")  # fmt: skip
    s3.create_bucket(Bucket=name)
    if events_file is not None:
        s3.upload_file(str(events_file), name, "in/events.jsonl")


def _events(fs: pafs.FileSystem, path: str) -> int:
    files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(pq.read_metadata(f.path, filesystem=fs).num_rows for f in files
               if f.path.endswith(".parquet"))  # fmt: skip


def test_s3_errors_mid_write_are_retried(moto_port, events_file, monkeypatch):
    port, _ = moto_port
    path, summary = events_file
    _bucket(port, "out")
    # Every PUT (folders, parts, rejects, report, marker) fails once with 503 SlowDown.
    proxy = FaultyProxy(port, lambda method, path, n: method == "PUT" and n == 0)
    try:
        _env(monkeypatch, proxy.endpoint)
        report = ingest(str(path), "s3://out/run", IngestConfig(block_mb=8, n_buckets=4))
    finally:
        proxy.close()
    assert proxy.injected >= 10
    assert report.events == summary["events"]
    fs, _ = storage.filesystem("s3://out/run")
    _env(monkeypatch, f"http://127.0.0.1:{port}")  # read back directly, no proxy
    fs, out = storage.filesystem("s3://out/run")
    assert _events(fs, f"{out}/events") == summary["events"]  # every part landed, once
    assert fs.get_file_info(f"{out}/events/_SUCCESS").type == pafs.FileType.File


def test_s3_errors_mid_read_are_retried(moto_port, events_file, monkeypatch):
    port, _ = moto_port
    path, summary = events_file
    _bucket(port, "inbox", path)
    # One GET in three (listings and the input's ranged reads alike) answers 503 SlowDown.
    proxy = FaultyProxy(port, lambda method, path, n: method == "GET" and n % 3 == 0)
    try:
        _env(monkeypatch, proxy.endpoint)
        report = ingest("s3://inbox/in/events.jsonl", "s3://inbox/run", IngestConfig(block_mb=2))
    finally:
        proxy.close()
    assert proxy.injected >= 5
    assert report.events == summary["events"] and report.rejects == 0
    _env(monkeypatch, f"http://127.0.0.1:{port}")
    fs, out = storage.filesystem("s3://inbox/run")
    assert _events(fs, f"{out}/events") == summary["events"]


def test_the_retry_strategy_travels_with_the_filesystem_to_ray_tasks(monkeypatch):
    """Ray tasks get the driver's filesystem pickled; pyarrow's pickle drops retry_strategy."""
    import pickle

    monkeypatch.setenv("FLYRAY_S3_MAX_ATTEMPTS", "9")
    fs = storage.s3_filesystem()
    monkeypatch.delenv("FLYRAY_S3_MAX_ATTEMPTS")
    copy = pickle.loads(pickle.dumps(fs))
    assert copy._attempts == 9 and copy.region == fs.region


def test_an_outage_mid_read_fails_cleanly_and_the_next_run_succeeds(
    moto_port, events_file, tmp_path, monkeypatch
):
    port, proc = moto_port
    path, summary = events_file
    _bucket(port, "inbox", path)
    _env(monkeypatch, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("FLYRAY_S3_MAX_ATTEMPTS", "2")  # give up fast once the store is gone
    out = tmp_path / "ingest"
    result: dict = {}

    def run() -> None:
        try:
            result["report"] = ingest(
                "s3://inbox/in/events.jsonl", str(out), IngestConfig(block_mb=1)
            )
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("events/bucket=*/part-*.parquet")):
        time.sleep(0.005)
    stop_group(proc)  # the store goes away with the ingest half done
    worker.join(timeout=300)
    assert "error" in result, "the ingest finished before the outage; make the input larger"
    assert is_transient(result["error"]), repr(result["error"])
    assert not (out / "events" / "_SUCCESS").exists()  # nothing claims to be complete
    with pytest.raises(FeatureError, match="_SUCCESS"):
        build_features(str(out / "events"), str(tmp_path / "features"))

    restarted = serve(proc.args, port, f"http://127.0.0.1:{port}")
    try:
        _bucket(port, "inbox", path)  # moto keeps nothing across restarts
        report = ingest("s3://inbox/in/events.jsonl", str(out), IngestConfig(block_mb=1))
    finally:
        stop_group(restarted)
    assert report.events == summary["events"]
    fs, events = storage.filesystem(str(out / "events"))
    assert _events(fs, events) == summary["events"]  # no part of the failed run left over
    assert (out / "events" / "_SUCCESS").exists()
