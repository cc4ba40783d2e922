"""MLflow tracking location and the champion gate that every workload registers through.

Tracking: MLFLOW_TRACKING_URI when set; otherwise an embedded store, sqlite plus a local
artifact directory under the project's data directory (FLYRAY_DATA_DIR, default ./.data).

The gate: a newly registered version takes the alias "champion" only if it beats the current
champion on the configured metric and beats the baseline it was evaluated against; otherwise it
stays registered, tagged with why it was not promoted. Every decision is tagged on the version.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)
CHAMPION = "champion"


def data_dir() -> Path:
    return Path(os.environ.get("FLYRAY_DATA_DIR", ".data")).absolute()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the embedded sqlite store under the data directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = data_dir() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def use_experiment(name: str) -> str:
    """Point mlflow at the tracking store and experiment; returns the experiment id.

    With the embedded store, artifacts go to <data dir>/mlflow/artifacts, not ./mlruns.
    """
    embedded = not os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri exports it
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = (data_dir() / "mlflow" / "artifacts").as_uri() if embedded else None
        experiment_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def metric_key(name: str) -> str:
    """'ndcg@10' -> 'ndcg_at_10', the key the metric is logged under."""
    return name.lower().replace("@", "_at_")


@dataclass
class GateDecision:
    model_name: str
    version: str
    metric: str
    value: float
    promoted: bool
    reason: str
    champion_version: str = ""  # the champion before this decision ("" if none)
    champion_value: float | None = None
    baseline_value: float | None = None


def champion_gate(
    model_name: str,
    version: str,
    metric: str,
    value: float,
    baseline_value: float | None = None,
    higher_is_better: bool = True,
    client: MlflowClient | None = None,
) -> GateDecision:
    """Move the champion alias to `version` if it beats the champion and the baseline."""
    client = client or MlflowClient(tracking_uri())
    key = metric_key(metric)
    try:
        champion = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        champion = None
    champion_value = None
    if champion is not None and champion.run_id:
        champion_value = client.get_run(champion.run_id).data.metrics.get(key)

    def beats(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    failures = []
    if baseline_value is not None and not beats(value, baseline_value):
        failures.append(f"{metric} {value:.4f} does not beat the baseline's {baseline_value:.4f}")
    if champion_value is not None and not beats(value, champion_value):
        failures.append(
            f"{metric} {value:.4f} does not beat champion v{champion.version}'s "
            f"{champion_value:.4f}"
        )
    promoted = not failures
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        reason = (
            f"{metric} {value:.4f} beats "
            + (
                f"champion v{champion.version}'s {champion_value:.4f}"
                if champion_value is not None
                else "no champion yet"
            )  # fmt: skip
            + (f" and the baseline's {baseline_value:.4f}" if baseline_value is not None else "")
        )
    else:
        reason = "; ".join(failures)
    client.set_model_version_tag(
        model_name, version, "promotion", "champion" if promoted else "rejected"
    )
    client.set_model_version_tag(model_name, version, "promotion_reason", reason)
    log.info("registry: %s v%s %s: %s", model_name, version,
             "promoted" if promoted else "not promoted", reason)  # fmt: skip
    return GateDecision(
        model_name, str(version), metric, value, promoted, reason,
        str(champion.version) if champion is not None else "", champion_value, baseline_value,
    )  # fmt: skip
