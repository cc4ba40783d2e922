"""The tabular workload: pipeline end to end on the bundled table, registry round trip in a fresh
process, Ray Train resume from an s3:// checkpoint, bad inputs, and the cluster serialization."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import workflows.tabular as wf
from flyray import storage
from flyray.lineage import DataInput
from flyray.raytrain import DistributedConfig
from flyray.tabular.data import (
    TableConfig,
    TableSpec,
    prepare,
    read_share,
    read_split,
    split_uri,
    write_breast_cancer,
)
from flyray.tabular.evaluate import evaluate
from flyray.tabular.report import identity
from flyray.tabular.train import XGBParams, load_model, predict, train_distributed
from tasks import deployment
from tasks.outputs import uri
from tests.test_reproduce import refused, reproduced


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_cluster")
def test_pipeline_trains_evaluates_registers_and_reproduces(
    tmp_path, monkeypatch, flyte_cache, pinned_commit, capsys, data_dir
):
    out = wf.xgboost_pipeline()
    spec, ev, training = out.spec, out.evaluation, out.training
    assert spec.rows == 569 and len(spec.features) == 30 and spec.label_classes == ["0", "1"]
    assert sum(spec.rows_by_split.values()) == 569 and min(spec.rows_by_split.values()) > 50
    m = ev.model
    assert m.auc >= 0.97 and m.rows == spec.rows_by_split["test"]
    (tn, fp), (fn, tp) = m.confusion
    assert tn + fp + fn + tp == m.rows
    assert m.accuracy == pytest.approx((tn + tp) / m.rows)
    assert m.precision == pytest.approx(tp / (tp + fp)) and m.recall == pytest.approx(
        tp / (tp + fn)
    )
    assert ev.baseline.auc == 0.5 and ev.baseline.logloss > m.logloss
    assert max(ev.feature_importance.values()) > 0
    assert training.workers == 2 and 0 < training.rounds <= 100
    assert training.startup_seconds > 0 and training.boosting_seconds > 0
    assert len(training.validation_auc) >= training.rounds  # early stopping keeps the best round
    decision = out.registration.decision
    assert decision.promoted and decision.version == "1" and decision.metric == "auc"
    assert decision.baseline_value == 0.5
    client = mlflow.MlflowClient(out.registration.tracking_uri)
    run = client.get_run(out.registration.run_id)
    assert run.data.metrics["auc"] == m.auc and run.data.metrics["baseline.auc"] == 0.5
    assert run.data.tags["promotion"] == "champion"
    source, digest = DataInput.read_tag(run.data.tags["lineage.data.table"])
    assert len(digest) == 64 and (source, digest) == (spec.source, spec.fingerprint)
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.digest == digest[:32]

    # The registered model answers in a fresh process exactly as the trained booster does.
    booster, spec2 = load_model(uri(out.model))
    x, y = read_split(uri(out.test), spec2)
    want = predict(booster, spec2, x)
    assert evaluate(want, y, "check").auc == pytest.approx(m.auc)
    rows = pd.DataFrame(x[:20], columns=spec2.features).to_json(orient="split")
    code = (
        "import sys, json, mlflow, pandas as pd, io; "
        "m = mlflow.pyfunc.load_model('models:/flyray-xgboost@champion'); "
        "df = pd.read_json(io.StringIO(sys.stdin.read()), orient='split').astype('float32'); "
        "print(json.dumps([float(v) for v in m.predict(df)]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], input=rows, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": out.registration.tracking_uri}, check=True,
    )  # fmt: skip
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got, want[:20], rtol=1e-5)

    # `make reproduce`: the same table (checked), the same code, the same numbers bit for bit;
    # the original model and its champion untouched
    printed = reproduced("flyray-xgboost", "1", capsys)
    assert f"data table: {spec.source} unchanged" in printed
    assert "auc" in printed and "22 of 22 metrics identical" in printed
    again = client.get_model_version("flyray-xgboost-reproduced", "1")
    assert again.tags["lineage.data.table"].endswith(f" sha256:{digest}")  # demo table rewritten
    assert client.get_registered_model("flyray-xgboost").aliases == {"champion": 1}
    # refused before anything runs: the table changed since, naming it; another commit
    pq.write_table(pq.read_table(spec.source).slice(1), spec.source)
    assert f"data input table: {spec.source} changed since version 1" in refused(
        "flyray-xgboost", "1", capsys
    )
    monkeypatch.setenv("FLYRAY_CODE_VERSION", "b" * 40)
    deployment.current.cache_clear()
    why = refused("flyray-xgboost", "1", capsys)
    assert f"trained from commit {pinned_commit}; this checkout is {'b' * 40}" in why
    assert "not in the registry" in refused("flyray-xgboost", "9", capsys)


def test_identity_tells_another_table_from_a_new_split_of_the_same():
    """What the gate compares (test_registry runs the gate on identities): the same table split
    another way or read from elsewhere is the same task, so its champion is scored on the
    challenger's rows (test_champion_scoring); another label or schema is another task, and
    both are named in the refusal."""
    features = ["area", "texture", "kind"]
    first = TableSpec("s3://a/t.parquet", 1, "label", ["0", "1"], features, {"kind": ["x", "y"]},
                      569, 0, {"train": 389, "validation": 85, "test": 95}, 0.37)  # fmt: skip
    resplit = replace(first, source="/data/t.parquet", rows_by_split={"train": 400, "test": 169})
    other = replace(first, label="type")
    retyped = replace(first, categories={})
    key = identity(first, "auc").key()
    assert identity(resplit, "auc").key() == key
    assert identity(other, "auc").key() != key and identity(retyped, "auc").key() != key
    assert "label = 1 (vs 0)" in identity(first, "auc").target
    assert "type = 1 (vs 0)" in identity(other, "auc").target


@pytest.fixture
def bucket(s3_env):
    """A fresh bucket on the loopback S3 server."""
    import uuid

    import boto3

    name = f"tabular-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_cluster")
def test_lost_worker_resumes_from_the_s3_checkpoint(bucket, tmp_path):
    """Prepare and train entirely on s3://; a worker failing after round 30 restarts the group,
    which resumes from the round-30 checkpoint and finishes all rounds."""
    src = write_breast_cancer(f"{bucket}/in")
    spec = prepare(src, f"{bucket}/prepared")
    assert spec.rows == 569
    marker = str(tmp_path / "failed-once")

    import xgboost as xgb

    class FailOnce(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):
            if epoch == 29 and not os.path.exists(marker):
                open(marker, "w").close()
                raise RuntimeError("injected worker failure after round 30")
            return False

    params = XGBParams(num_boost_round=40, early_stopping_rounds=0)
    # Two restarts allowed: on a loaded CI machine an attempt before the injected failure once
    # failed too, and the injected one then exhausted a budget of one.
    config = DistributedConfig(checkpoint_every=10, checkpoint_uri=f"{bucket}/ckpt", max_failures=2)
    booster, report = train_distributed(
        split_uri(f"{bucket}/prepared", "train"), split_uri(f"{bucket}/prepared", "validation"),
        spec, params, config, callbacks=(FailOnce(),),
    )  # fmt: skip
    assert os.path.exists(marker)
    assert report.restored_from_round == 30 and booster.num_boosted_rounds() == 40
    assert len(report.validation_auc) == 10  # the curves since the restore
    fs, path = storage.filesystem(report.checkpoint_uri)
    assert fs.get_file_info(pa.fs.FileSelector(path, recursive=True))  # checkpoints on s3
    x, y = read_split(split_uri(f"{bucket}/prepared", "test"), spec)
    assert evaluate(predict(booster, spec, x), y, "resumed").auc >= 0.97


# ---------------------------------------------------------------------------------- bad input


def _write(path, frame: pd.DataFrame | pa.Table) -> str:
    table = (
        frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


def _frame(n=200, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2],
                         "label": (x[:, 0] > 0).astype(int)})  # fmt: skip


def test_missing_label_column_is_named(tmp_path):
    src = _write(tmp_path / "t.parquet", _frame().rename(columns={"label": "target"}))
    with pytest.raises(ValueError, match=r"label column 'label' not found; columns are .*target"):
        prepare(src, str(tmp_path / "out"))


@pytest.mark.usefixtures("ray_cluster")
def test_non_binary_labels_are_named(tmp_path):
    frame = _frame()
    frame.loc[:9, "label"] = 2
    src = _write(tmp_path / "t.parquet", frame)
    with pytest.raises(
        ValueError, match=r"label column 'label' must have exactly 2 .*found 3: \['0', '1', '2'\]"
    ):
        prepare(src, str(tmp_path / "out"))


@pytest.mark.usefixtures("ray_cluster")
def test_all_nan_column_is_named(tmp_path):
    frame = _frame()
    frame["b"] = np.nan
    src = _write(tmp_path / "t.parquet", frame)
    with pytest.raises(ValueError, match=r"columns \['b'\] have no values"):
        prepare(src, str(tmp_path / "out"))


def test_empty_dataset_is_an_error(tmp_path):
    src = _write(tmp_path / "t.parquet", _frame().iloc[:0])
    with pytest.raises(ValueError, match=r"empty dataset: .*t.parquet has no rows"):
        prepare(src, str(tmp_path / "out"))


def test_schema_drift_names_both_files(tmp_path):
    _write(tmp_path / "in" / "part-0.parquet", _frame())
    drifted = _frame(seed=1)
    drifted["c"] = drifted["c"].astype(str)
    _write(tmp_path / "in" / "part-1.parquet", drifted.drop(columns=["b"]))
    with pytest.raises(ValueError) as err:
        prepare(str(tmp_path / "in"), str(tmp_path / "out"))
    msg = str(err.value)
    assert (
        "schema drift" in msg and "part-1.parquet differs from" in msg and "part-0.parquet" in msg
    )
    assert "missing columns ['b']" in msg and re.search(r"c \(double -> (large_)?string\)", msg)


@pytest.mark.usefixtures("ray_cluster")
def test_rows_without_label_are_kept_and_counted(tmp_path):
    frame = _frame(400)
    frame["label"] = frame["label"].astype("Int64")
    frame.loc[[5, 17], "label"] = pd.NA
    frame["color"] = np.where(frame["a"] > 1, "red", "blue")  # a categorical feature
    src = _write(tmp_path / "t.parquet", frame)
    spec = prepare(src, str(tmp_path / "out"), TableConfig(max_reject_fraction=0.01))
    assert spec.rejected_rows == 2 and sum(spec.rows_by_split.values()) == 398
    rejects = pq.read_table(spec.rejects_uri).to_pandas()
    assert sorted(rejects["a"]) == sorted(frame.loc[[5, 17], "a"]) and rejects["label"].isna().all()
    assert spec.categories == {"color": ["blue", "red"]} and spec.feature_types()[-1] == "c"
    x, _ = read_split(split_uri(str(tmp_path / "out"), "train"), spec)
    assert set(np.unique(x[:, -1])) <= {0.0, 1.0}
    with pytest.raises(
        ValueError, match=r"2 of 400 rows \(0.50%\) have no value in label column 'label'"
    ):
        prepare(src, str(tmp_path / "out2"), TableConfig(max_reject_fraction=0.001))
    assert pq.read_table(str(tmp_path / "out2" / "rejects")).num_rows == 2  # written first


# ---------------------------------------------------------------------------------- cluster path


def test_worker_shares_partition_the_rows(tmp_path):
    """Every row in exactly one worker's share, also when a row group holds both ends of one."""
    pq.write_table(pa.table({"a": np.arange(10.0), "y": np.zeros(10)}), tmp_path / "f1.parquet")
    pq.write_table(pa.table({"a": np.arange(10.0, 30.0), "y": np.zeros(20)}),
                   tmp_path / "f2.parquet", row_group_size=10)  # fmt: skip
    spec = type("Spec", (), {"features": ["a"], "label": "y"})
    fs, _ = storage.filesystem(str(tmp_path))
    paths = [str(tmp_path / "f1.parquet"), str(tmp_path / "f2.parquet")]
    for world in (1, 2, 3, 7):
        shares = [read_share(fs, paths, spec, rank, world)[0][:, 0] for rank in range(world)]
        assert sorted(np.concatenate(shares).tolist()) == list(range(30)), world
