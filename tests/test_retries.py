"""Flyte retries: a transient failure (the S3 store is down) is reported as recoverable, so Flyte
retries the task, and the retry succeeds once the store is back; bad input is non-recoverable,
so it is not retried, and says why. Tasks run through `pyflyte-execute`, the entry point a
cluster runs, and the verdict is read from the error document it writes for Flyte."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest
from flyteidl.core import errors_pb2, literals_pb2
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.core.utils import load_proto_from_file, write_proto_to_file
from flytekit.tools.translator import get_serializable

import tasks.clickstream as clickstream
from flyray.clickstream.ingest import IngestError
from k8s import check
from tasks.retries import is_transient
from tests.background import stop_group
from tests.conftest import REPO, _free_port, event, jsonl, serve

RECOVERABLE = errors_pb2.ContainerError.RECOVERABLE
NON_RECOVERABLE = errors_pb2.ContainerError.NON_RECOVERABLE


def _moto(port: int):
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return serve(cmd, port, f"http://127.0.0.1:{port}")


def _upload(endpoint: str) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="k", aws_secret_access_key="s")  # fmt: skip
    s3.create_bucket(Bucket="clicks")
    s3.put_object(Bucket="clicks", Key="day/events.jsonl", Body=jsonl(event(), event(user=2)))


def _execute(task, inputs: dict, workdir: Path, endpoint: str):
    """Run one attempt of `task` as Flyte would; return (error document or None, outputs)."""
    template = get_serializable(OrderedDict(), check.serialization_settings(), task).template
    workdir.mkdir(parents=True)
    ctx = FlyteContextManager.current_context()
    literals = TypeEngine.dict_to_literal_map(ctx, inputs, task.python_interface.inputs)
    write_proto_to_file(literals.to_flyte_idl(), str(workdir / "inputs.pb"))
    values = {"{{.input}}": str(workdir / "inputs.pb"), "{{.outputPrefix}}": str(workdir / "out"),
              "{{.rawOutputDataPrefix}}": str(workdir / "raw"),
              "{{.checkpointOutputPrefix}}": str(workdir / "ckpt"), "{{.prevCheckpointPrefix}}": ""}  # fmt: skip
    args = [values.get(a, a) for a in template.container.args]
    args[0] = str(Path(sys.executable).parent / args[0])  # pyflyte-execute of this venv
    env = {**os.environ, "FLYRAY_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}  # fmt: skip
    subprocess.run(args, cwd=REPO, env=env, capture_output=True, timeout=300)
    error, outputs = workdir / "out" / "error.pb", workdir / "out" / "outputs.pb"
    if error.exists():
        return load_proto_from_file(errors_pb2.ErrorDocument, str(error)).error, None
    return None, load_proto_from_file(literals_pb2.LiteralMap, str(outputs))


INPUTS = {"source": "s3://clicks/day/", "demo_events": 0, "demo_seed": 0, "run_date": None}


@pytest.mark.e2e
def test_a_store_outage_is_retried_and_the_retry_succeeds(tmp_path):
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = _moto(port)
    _upload(endpoint)
    stop_group(server)  # the store goes down before the task runs
    retries = clickstream.resolve_source.metadata.retries
    assert retries >= 1

    error, _ = _execute(clickstream.resolve_source, INPUTS, tmp_path / "attempt-1", endpoint)
    assert error.kind == RECOVERABLE  # Flyte retries it (while attempts <= retries)
    assert "transient failure" in error.message and "NETWORK_CONNECTION" in error.message

    server = _moto(port)  # the store is back (moto keeps no data: load it again)
    try:
        _upload(endpoint)
        error, outputs = _execute(clickstream.resolve_source, INPUTS, tmp_path / "attempt-2",
                                  endpoint)  # fmt: skip
    finally:
        stop_group(server)
    assert error is None
    assert outputs.literals["source"].scalar.primitive.string_value == "s3://clicks/day/"
    assert outputs.literals["fingerprint"].scalar.primitive.string_value


@pytest.mark.e2e
def test_bad_input_is_not_retried_and_says_why(tmp_path, s3_env):
    error, _ = _execute(clickstream.resolve_source,
                        {**INPUTS, "source": "s3://no-such-bucket/day/"}, tmp_path / "run", s3_env)  # fmt: skip
    assert error.kind == NON_RECOVERABLE  # Flyte fails the task at once
    assert "s3://no-such-bucket/day/" in error.message


def test_transient_and_permanent_errors_are_told_apart(tmp_path):
    fs = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{_free_port()}",
                           access_key="k", secret_key="s", region="us-east-1")  # fmt: skip
    with pytest.raises(OSError) as outage:
        fs.get_file_info("bucket/key")
    assert is_transient(outage.value)
    try:  # a transient error under a wrapper (as Ray task errors wrap their cause)
        raise RuntimeError("step failed") from ConnectionResetError("peer reset")
    except RuntimeError as wrapped:
        assert is_transient(wrapped)
    assert not is_transient(IngestError("events.jsonl line 3: unknown event_type 'x'"))
    assert not is_transient(FileNotFoundError(str(tmp_path / "missing.jsonl")))
    assert not is_transient(ValueError("n_factors must be positive"))
