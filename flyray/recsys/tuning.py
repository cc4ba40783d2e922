"""Hyperparameter search for the recommender with Ray Tune, on validation NDCG@k.

Each trial trains one model (FunkSVD or iALS) in its own Ray task with one CPU, so trials run
side by side on whatever Ray cluster the caller has (the training task's cluster, the local Ray
under `make run`). After every epoch a trial reports NDCG@k on the validation split (the same
computation as the final evaluation, on a seeded sample of validation users), which lets the
ASHA scheduler stop unpromising trials early. The search is random (seeded), its first trials are
the given parameters, and they stay unless a trial beats them by more than the standard error of
their validation score (so the result is never worse on validation than not tuning, and a small
validation split's luck does not pick the model); it stops at `trials` or when the time budget
runs out, whichever comes first.

    result = tune_recommender(train, validation, n_users, n_items, "funksvd",
                              FunkSVDParams(...), IALSParams(), TuningConfig(trials=12))
    result.model, result.funksvd, result.ials, result.report   # the winner and the table
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from ray import tune

from flyray import decks
from flyray.raytrain import require_ray
from flyray.recsys import trainers
from flyray.recsys.evaluate import ndcg_with_error
from flyray.recsys.funksvd import FunkSVDParams
from flyray.recsys.ials import IALSParams
from flyray.recsys.model import FactorModel, Ratings

log = logging.getLogger(__name__)


def default_space() -> dict[str, dict]:
    """The search space per model family. FunkSVD: around what the 1M demo rewards
    (popularity-weighted negatives, beta 0.3-0.9; bench.recsys); ranking without the item bias
    is left out by default (it lost every trial there), add it with `TuningConfig.space`.
    iALS: regularisation over four decades, confidence alpha 1-100 (alpha under 1 lost on every
    bench dataset)."""
    return {
        "funksvd": {
            "n_factors": tune.choice([32, 64, 128]),
            "lr": tune.loguniform(5e-3, 3e-2),
            "reg": tune.loguniform(1e-2, 0.2),
            "negatives": tune.randint(2, 8),
            "negative_beta": tune.uniform(0.3, 0.9),
        },
        "ials": {
            "n_factors": tune.choice([32, 64, 128]),
            "reg": tune.loguniform(1e-2, 1e2),
            "alpha": tune.loguniform(1.0, 100.0),
        },
    }


@dataclass
class TuningConfig:
    """How the recommender is tuned before its final training (trials = 0: not at all)."""

    trials: int = 8  # at most this many configurations (the time budget may stop it sooner)
    time_budget_s: float = 45.0  # wall-clock budget of the whole search
    metric: str = "ndcg@10"  # on the validation split; only ndcg@k is searched on
    models: str = ""  # families searched: "" = the workflow's model; "funksvd,ials": both
    grace_epochs: int = 3  # ASHA: epochs every trial gets before it can be stopped
    validation_users: int = 5_000  # validation users ranked per report (a seeded sample)
    # JSON {"funksvd": {"n_factors": [32, 64], "rank_item_bias": [true, false]}}: these
    # parameters (any field but n_epochs and seed) tried among the listed values instead.
    space: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trials < 0 or self.time_budget_s <= 0 or self.grace_epochs < 1:
            raise ValueError("TuningConfig: trials >= 0, time_budget_s > 0, grace_epochs >= 1")
        name, _, k = self.metric.partition("@")
        if name.lower() != "ndcg" or not k.isdigit():
            raise ValueError(f"TuningConfig.metric: expected ndcg@k, got {self.metric!r}")
        unknown = set(self.families("funksvd")) - set(trainers.MODELS)
        if unknown:
            raise ValueError(
                f"TuningConfig.models: unknown {sorted(unknown)}; known {trainers.MODELS}"
            )

    @property
    def k(self) -> int:
        return int(self.metric.partition("@")[2])

    def families(self, model: str) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()] or [model]

    def search_space(self, model: str) -> dict:
        space = default_space()
        fields = {"funksvd": FunkSVDParams.__dataclass_fields__,
                  "ials": IALSParams.__dataclass_fields__}  # fmt: skip
        for family, choices in (json.loads(self.space) if self.space else {}).items():
            if family not in space:
                raise ValueError(f"TuningConfig.space: unknown model {family!r}")
            for name, values in choices.items():
                if name not in fields[family] or name in ("n_epochs", "seed"):
                    raise ValueError(f"TuningConfig.space: {family} has no parameter {name!r}")
                space[family][name] = tune.choice(list(values))
        families = self.families(model)
        return {"model": tune.choice(families), **{f: space[f] for f in families}}


@dataclass
class TuningReport:
    """The search as shown and logged: one row per trial, the winner, its validation curve."""

    metric: str
    trials: int = 0
    seconds: float = 0.0
    best_model: str = ""
    best_score: float = float("nan")
    best_params: dict = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)  # trial, model, params, score, se, epochs
    curves: dict[str, list[float]] = field(default_factory=dict)  # trial -> metric per epoch
    decision: str = ""  # why the winner won, in a sentence

    def deck(self) -> list[str]:
        if not self.table:
            said = self.decision or "off (trials = 0)"
            return [decks.table_html({"tuning": said}, "Hyperparameter search")]
        longest = max(len(c) for c in self.curves.values())
        padded = {t: c + [math.nan] * (longest - len(c)) for t, c in self.curves.items()}
        return [
            decks.table_html(
                {
                    "model": self.best_model,
                    f"validation {self.metric}": self.best_score,
                    **self.best_params,
                    "decision": self.decision,
                },
                f"Best of {self.trials} trials ({self.seconds:.0f} s)",
            ),  # fmt: skip
            decks.line_chart_html(
                list(range(1, longest + 1)),
                padded,
                f"Validation {self.metric} per trial",
                "epoch",
                self.metric,
            ),  # fmt: skip
            decks.table_html(self.table, "Trials"),
        ]

    def plot(self, path: str) -> str:
        """The per-trial validation curves as a PNG (for MLflow)."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for trial, curve in self.curves.items():
            ax.plot(range(1, len(curve) + 1), curve, marker=".", label=trial)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {self.metric}")
        ax.legend(fontsize="small")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path


@dataclass
class TuningResult:
    model: str
    funksvd: FunkSVDParams
    ials: IALSParams
    report: TuningReport


def _plain(value):
    """A sampled value as a plain Python number (Tune samples numpy scalars)."""
    return value.item() if isinstance(value, np.generic) else value


def _trial(config: dict, data: dict) -> None:
    """One trial: train the sampled model, reporting validation NDCG@k after every epoch."""
    family = config["model"]
    train, n_users, n_items = data["train"], data["n_users"], data["n_items"]

    def report(model: FactorModel, epoch: int) -> None:
        score, error = ndcg_with_error(
            model, data["validation"], data["k"], data["users"], data["seed"]
        )
        tune.report({"score": score, "se": error, "epoch": epoch})

    params = replace(data[family], **config[family])
    trainers.fit_local(family, train, n_users, n_items, params, report)


def _as_given(model: str, funksvd: FunkSVDParams, ials_params: IALSParams, space: dict) -> dict:
    """The given parameters as a point of the search space (evaluated first)."""
    given = {"funksvd": asdict(funksvd), "ials": asdict(ials_params)}
    return {
        "model": model,
        **{f: {k: given[f][k] for k in space[f]} for f in space if f != "model"},
    }


_CLOUD_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                      "AWS_SECURITY_TOKEN")  # fmt: skip


@contextlib.contextmanager
def _without_cloud_credentials():
    """Ray Tune copies AWS credentials from the driver's environment into every trial's
    runtime_env, which Ray's runtime-env agent writes to its log. Trials read nothing from object
    storage (data arrive in memory, checkpoints go to a local folder), so they start without."""
    saved = {k: os.environ.pop(k) for k in _CLOUD_CREDENTIALS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class _GivenRunsOut(tune.schedulers.ASHAScheduler):
    """ASHA that never stops the given parameters' trials early: every other trial is judged
    against their whole validation curve (the one-standard-error rule)."""

    def __init__(self, given: list[dict], **kwargs):
        super().__init__(**kwargs)
        self._given = given

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        return tune.schedulers.TrialScheduler.CONTINUE if trial.config in self._given else action


def _winner(report: TuningReport) -> dict:
    """The best trial, unless the given parameters are within one standard error of it (the
    one-standard-error rule): on a few hundred validation users the best of many trials is
    largely luck, and the given parameters are the ones known to hold up elsewhere."""
    best = max(report.table, key=lambda row: row["score"])
    given = next((row for row in report.table if row["given"]), None)
    if given is None or best is given:
        report.decision = f"best of {report.trials} trials"
        return best
    if best["score"] - given["score"] <= given["se"]:
        report.decision = (
            f"kept the given parameters: the best trial ({best['score']:.4f}) is within one "
            f"standard error ({given['se']:.4f}) of them ({given['score']:.4f})"
        )
        return given
    report.decision = (
        f"best of {report.trials} trials, {best['score'] - given['score']:.4f} above the given "
        f"parameters (standard error {given['se']:.4f})"
    )
    return best


def tune_recommender(
    train: Ratings,
    validation: Ratings,
    n_users: int,
    n_items: int,
    model: str,
    funksvd: FunkSVDParams,
    ials_params: IALSParams,
    config: TuningConfig,
) -> TuningResult:
    """Search the space of `config` on Ray Tune; the given parameters when trials = 0."""
    report = TuningReport(config.metric)
    trainers.check(model)
    if config.trials == 0:
        return TuningResult(model, funksvd, ials_params, report)
    require_ray()
    began = time.perf_counter()
    space = config.search_space(model)
    points = [_as_given(f, funksvd, ials_params, space) for f in config.families(model)][
        : config.trials
    ]
    epochs = max(funksvd.n_epochs, ials_params.n_epochs)
    data = {
        "train": train, "validation": validation, "n_users": n_users, "n_items": n_items,
        "funksvd": funksvd, "ials": ials_params, "k": config.k, "users": config.validation_users,
        "seed": config.seed,
    }  # fmt: skip
    trainable = tune.with_resources(tune.with_parameters(_trial, data=data), {"cpu": 1})
    with tempfile.TemporaryDirectory(prefix="tune-") as storage, _without_cloud_credentials():
        results = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="score",
                mode="max",
                num_samples=config.trials,
                time_budget_s=config.time_budget_s,
                scheduler=_GivenRunsOut(
                    points, max_t=epochs, grace_period=min(config.grace_epochs, epochs)
                ),
                search_alg=tune.search.BasicVariantGenerator(
                    points_to_evaluate=points, random_state=config.seed
                ),
            ),
            run_config=tune.RunConfig(storage_path=storage, name="tune", verbose=0),
        ).fit()
        finished = [r for r in results if r.metrics and "score" in r.metrics]
        if not finished:  # the budget bounds the time, not the run: train what was given
            report.seconds = time.perf_counter() - began
            report.decision = (
                f"no trial reported a score within the {config.time_budget_s:g} s budget: the "
                "given parameters are trained (raise TuningConfig.time_budget_s to search)"
            )
            log.warning("tuning: %s", report.decision)
            return TuningResult(model, funksvd, ials_params, report)
        for n, result in enumerate(finished):
            family = result.config["model"]
            params = {k: _plain(v) for k, v in result.config[family].items()}
            frame = result.metrics_dataframe
            curve = [float(v) for v in frame["score"]]
            best_epoch = int(np.argmax(curve))
            name = f"{n}:{family}"
            report.curves[name] = curve
            report.table.append({"trial": name, "model": family, **params,
                                 "score": curve[best_epoch],
                                 "se": float(frame["se"].iloc[best_epoch]),
                                 "best epoch": best_epoch + 1, "epochs run": len(curve),
                                 "given": result.config == points[0]})  # fmt: skip
    report.trials, report.seconds = len(report.table), time.perf_counter() - began
    best = _winner(report)
    family = best["model"]
    report.best_model, report.best_score = family, best["score"]
    report.best_params = {k: v for k, v in best.items() if k in space[family]}
    # Early stopping: a trial that ran every epoch and peaked before the last one, by more than
    # the score's standard error, sets the final training's epochs (a trial cut short by the
    # budget or ASHA says nothing about later ones).
    given = funksvd.n_epochs if family == "funksvd" else ials_params.n_epochs
    last = report.curves[best["trial"]][-1]
    if best["epochs run"] == given and best["score"] - last > best["se"]:
        report.best_params["n_epochs"] = best["best epoch"]
        report.decision += f"; {best['best epoch']} of {given} epochs (early stopping)"
    log.info(
        "tuning: %d trials in %.0f s, %s %s = %.4f %s (%s)", report.trials, report.seconds,
        family, config.metric, report.best_score, report.best_params, report.decision,
    )  # fmt: skip
    if family == "ials":
        return TuningResult(family, funksvd, replace(ials_params, **report.best_params), report)
    return TuningResult(family, replace(funksvd, **report.best_params), ials_params, report)
