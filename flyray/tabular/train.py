"""XGBoost on prepared splits: in one process, or data-parallel on Ray Train V2.

The Ray path is Ray Train's XGBoostTrainer (xgboost.collective over the worker group) fed by
Ray Data, tuned for small clusters after measuring it (bench/xgboost.py):
- RayTrainReportCallback reports metrics to Ray Train after every round by default; each report
  cost ~1.7 s here against ~0.2 s for a round on 1M rows, so metrics travel only with the
  checkpoints (every `checkpoint_every` rounds and at the end).
- Early stopping stays inside xgboost (evaluated on the validation shards, reduced over workers).
- Each worker reads its contiguous share of the split files in place with pyarrow and builds a
  QuantileDMatrix (hist's input). Feeding the workers Ray Data shards instead (read_parquet,
  materialized first, or Ray Data gets no CPU beside 2 workers on 2 CPUs) measured no faster
  here and adds Ray Data's actors to every run; the splits are already Ray Data's output.
- The run is sized and made fault tolerant by flyray.raytrain's DistributedConfig: checkpoints
  every `checkpoint_every` rounds (each one is a Ray Train report: about 25 rounds apart keeps
  their cost small) to `checkpoint_uri` (local or s3://); a lost worker restarts the group, which
  resumes from the latest checkpoint (`max_failures`), with fewer workers when the cluster has
  lost a node (`min_workers`, elastic), and a run started again on the same checkpoint_uri
  resumes too (its Ray Train run name is always RUN_NAME).
The workers time-stamp start, data and boosting, so the report splits the wall time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import xgboost as xgb

from flyray import storage
from flyray.raytrain import DistributedConfig, TrainingProgress, run_config
from flyray.tabular.data import TableSpec, read_share, read_split, split_files

log = logging.getLogger(__name__)
RUN_NAME = "xgboost"  # fixed, so that a run started again on its checkpoint_uri resumes


@dataclass
class XGBParams:
    """Booster hyperparameters (binary:logistic, hist)."""

    num_boost_round: int = 100
    max_depth: int = 6
    eta: float = 0.1
    min_child_weight: float = 1.0
    subsample: float = 1.0
    colsample_bytree: float = 1.0
    reg_lambda: float = 1.0
    max_bin: int = 256
    early_stopping_rounds: int = 10  # on validation logloss; 0 = off
    seed: int = 0

    def booster_params(self, nthread: int) -> dict:
        return {
            "objective": "binary:logistic",
            "tree_method": "hist",
            "eval_metric": ["auc", "logloss"],  # the last one drives early stopping
            "max_depth": self.max_depth,
            "eta": self.eta,
            "min_child_weight": self.min_child_weight,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "lambda": self.reg_lambda,
            "max_bin": self.max_bin,
            "seed": self.seed,
            "nthread": nthread,
        }


@dataclass
class TrainingReport:
    """What training did and where the time went (seconds)."""

    workers: int  # in the worker group that finished (fewer than asked after a lost node)
    rounds: int
    validation_auc: list[float] = field(default_factory=list)  # per round since the last restore
    validation_logloss: list[float] = field(default_factory=list)
    restored_from_round: int = 0
    startup_seconds: float = 0.0  # fit() called -> train loop running in the workers
    data_seconds: float = 0.0  # reading the worker's rows, building the QuantileDMatrix
    boosting_seconds: float = 0.0
    total_seconds: float = 0.0
    checkpoint_uri: str = ""


def _dmatrices(
    x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, spec: TableSpec,
    params: XGBParams, nthread: int,
) -> tuple[xgb.QuantileDMatrix, xgb.QuantileDMatrix]:  # fmt: skip
    kw = {
        "feature_names": spec.features, "feature_types": spec.feature_types(),
        "max_bin": params.max_bin, "nthread": nthread, "enable_categorical": bool(spec.categories),
    }  # fmt: skip
    dtrain = xgb.QuantileDMatrix(x, label=y, **kw)
    return dtrain, xgb.QuantileDMatrix(xv, label=yv, ref=dtrain, **kw)


def _callbacks(params: XGBParams) -> list:
    if not params.early_stopping_rounds:
        return []
    # save_best: the returned (and checkpointed at the end) model stops at the best round
    return [xgb.callback.EarlyStopping(rounds=params.early_stopping_rounds, save_best=True)]


def train_local(
    train_uri: str, validation_uri: str, spec: TableSpec, params: XGBParams, nthread: int = 0
) -> tuple[xgb.Booster, TrainingReport]:
    """Plain xgboost.train in this process: the bar the Ray path is measured against."""
    began = time.time()
    x, y = read_split(train_uri, spec)
    xv, yv = read_split(validation_uri, spec)
    dtrain, dvalid = _dmatrices(x, y, xv, yv, spec, params, nthread)
    del x, xv
    data_done = time.time()
    history: dict = {}
    booster = xgb.train(
        params.booster_params(nthread), dtrain, params.num_boost_round,
        evals=[(dvalid, "validation")], evals_result=history, callbacks=_callbacks(params),
        verbose_eval=False,
    )  # fmt: skip
    done = time.time()
    return booster, TrainingReport(
        workers=0, rounds=booster.num_boosted_rounds(),
        validation_auc=history["validation"]["auc"],
        validation_logloss=history["validation"]["logloss"],
        data_seconds=data_done - began, boosting_seconds=done - data_done,
        total_seconds=done - began,
    )  # fmt: skip


# ---------------------------------------------------------------------------------- Ray Train


def _report_at_checkpoints():
    from ray.train.xgboost import RayTrainReportCallback

    class ReportAtCheckpoints(RayTrainReportCallback):
        """RayTrainReportCallback without the per-round metric reports (~1.7 s each here); the
        validation curves so far travel with each checkpoint instead."""

        def _report_metrics(self, report_dict: dict) -> None:
            pass

        def _get_report_dict(self, evals_log) -> dict:
            valid = evals_log.get("validation", {})
            return {
                **super()._get_report_dict(evals_log),
                "validation_auc": [float(v) for v in valid.get("auc", [])],
                "validation_logloss": [float(v) for v in valid.get("logloss", [])],
            }

    return ReportAtCheckpoints


def _share_xy(name: str, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """This worker's contiguous share of a split's rows, read in place (see read_share)."""
    import ray.train

    ctx = ray.train.get_context()
    fs, paths = config["files"][name]
    return read_share(fs, paths, config["spec"], ctx.get_world_rank(), ctx.get_world_size())


def _train_loop(config: dict) -> None:
    """Runs in every Ray Train worker, inside xgboost's collective communicator."""
    import ray.train

    started = time.time()
    spec, params, nthread = config["spec"], config["params"], config["nthread"]
    x, y = _share_xy("train", config)
    xv, yv = _share_xy("validation", config)
    dtrain, dvalid = _dmatrices(x, y, xv, yv, spec, params, nthread)
    del x, xv
    data_done = time.time()
    reporter = _report_at_checkpoints()
    booster, restored = None, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        booster = reporter.get_model(checkpoint)
        restored = booster.num_boosted_rounds()

    def finish(metrics: dict) -> dict:
        return {**metrics, "started_at": started, "data_done_at": data_done,
                "boosting_done_at": time.time(), "restored_from_round": restored,
                "workers": ray.train.get_context().get_world_size()}  # fmt: skip

    xgb.train(
        params.booster_params(nthread), dtrain, max(0, params.num_boost_round - restored),
        evals=[(dvalid, "validation")], xgb_model=booster,
        verbose_eval=False,
        callbacks=[
            *_callbacks(params),
            reporter(frequency=config["checkpoint_every"], results_postprocessing_fn=finish),
            *config["callbacks"],
        ],
    )  # fmt: skip


def train_distributed(
    train_uri: str,
    validation_uri: str,
    spec: TableSpec,
    params: XGBParams,
    config: DistributedConfig,
    callbacks: tuple = (),
) -> tuple[xgb.Booster, TrainingReport]:
    """XGBoostTrainer over `config.workers` workers of `cpus_per_worker` CPUs (xgboost's
    nthread); extra xgboost `callbacks` run in every worker (after the checkpoint reporter)."""
    import ray.train
    from ray.train.xgboost import XGBoostTrainer

    began = time.time()
    progress = TrainingProgress(params.num_boost_round, "XGBoost", "round", config.checkpoint_every)
    run, ckpt_uri = run_config(RUN_NAME, config, callbacks=progress.callbacks)
    trainer = XGBoostTrainer(
        _train_loop,
        train_loop_config={
            "spec": spec,
            "params": params,
            "nthread": config.cpus_per_worker,
            "checkpoint_every": config.checkpoint_every,
            "callbacks": list(callbacks),
            "files": {"train": split_files(train_uri), "validation": split_files(validation_uri)},
        },  # fmt: skip
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.worker_count(),
            resources_per_worker={"CPU": config.cpus_per_worker},
        ),
        run_config=run,
    )
    with progress:
        result = trainer.fit()
    done = time.time()
    booster = _report_at_checkpoints().get_model(result.checkpoint)
    m = result.metrics
    report = TrainingReport(
        workers=m["workers"],
        rounds=booster.num_boosted_rounds(),
        validation_auc=m.get("validation_auc", []),  # none when resumed at the last round
        validation_logloss=m.get("validation_logloss", []),
        restored_from_round=m["restored_from_round"],
        startup_seconds=m["started_at"] - began,
        data_seconds=m["data_done_at"] - m["started_at"],
        boosting_seconds=m["boosting_done_at"] - m["data_done_at"],
        total_seconds=done - began,
        checkpoint_uri=storage.join(ckpt_uri, RUN_NAME),
    )
    log.info("xgboost: %d workers, %d rounds in %.1f s (start-up %.1f, data %.1f, boosting "
             "%.1f)", report.workers, report.rounds, report.total_seconds,
             report.startup_seconds, report.data_seconds, report.boosting_seconds)  # fmt: skip
    return booster, report


# ---------------------------------------------------------------------------------- model files


def save_model(booster: xgb.Booster, spec: TableSpec, uri: str) -> str:
    """`uri`/model.json (xgboost's JSON) and `uri`/spec.json (the encoding), local or s3://,
    each written whole or not at all."""
    fs, path = storage.filesystem(uri)
    storage.write_atomic(fs, f"{path}/model.json", bytes(booster.save_raw("json")))
    storage.write_atomic(fs, f"{path}/spec.json", spec.to_json().encode())
    return uri


def load_model(uri: str) -> tuple[xgb.Booster, TableSpec]:
    def read(name: str) -> bytes:
        fs, path = storage.filesystem(storage.join(uri, name))
        with fs.open_input_stream(path) as fh:
            return fh.read()

    booster = xgb.Booster()
    booster.load_model(bytearray(read("model.json")))
    return booster, TableSpec.from_json(read("spec.json").decode())


def predict(booster: xgb.Booster, spec: TableSpec, x: np.ndarray) -> np.ndarray:
    """Probabilities of the positive class for encoded features `x`."""
    dm = xgb.DMatrix(x, feature_names=spec.features, feature_types=spec.feature_types(),
                     enable_categorical=bool(spec.categories))  # fmt: skip
    return booster.predict(dm)
