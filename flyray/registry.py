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
import time
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


@dataclass
class Registration:
    """Where a registration's MLflow run is, and the champion gate's decision: the output of
    every workload's register task."""

    tracking_uri: str
    run_id: str
    decision: GateDecision


def champion_gate(
    model_name: str,
    version: str,
    metric: str,
    value: float,
    baseline_value: float | None = None,
    higher_is_better: bool = True,
    client: MlflowClient | None = None,
) -> GateDecision:
    """Move the champion alias to `version` if it beats the champion and the baseline.

    Safe when pipelines finish at once: each version's gate value is recorded on it first, and
    after deciding every gate settles the alias on the best eligible version, so whichever
    gate writes last, the alias ends on the better model (MLflow has no compare-and-set).
    """
    client = client or MlflowClient(tracking_uri())
    key = metric_key(metric)

    def beats(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    eligible = baseline_value is None or beats(value, baseline_value)
    for tag, text in (("gate.metric", key), ("gate.value", repr(float(value))),
                      ("gate.eligible", str(eligible).lower())):  # fmt: skip
        client.set_model_version_tag(model_name, version, tag, text)
    champion = _alias_holder(client, model_name)
    champion_value = _gate_value(client, champion, key) if champion is not None else None

    failures = []
    if not eligible:
        failures.append(f"{metric} {value:.4f} does not beat the baseline's {baseline_value:.4f}")
    if champion_value is not None and not beats(value, champion_value):
        failures.append(
            f"{metric} {value:.4f} does not beat champion v{champion.version}'s "
            f"{champion_value:.4f}"
        )
    if not failures:
        _set_alias(client, model_name, version)
    holder = _settle(client, model_name, key, beats)
    if not failures and holder != str(version):
        failures.append(f"v{holder}, registered at the same time, beats it on {metric}")
    promoted = not failures
    if promoted:
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


def _alias_holder(client: MlflowClient, model_name: str):
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def _gate_value(client: MlflowClient, model_version, key: str) -> float | None:
    """A version's gate value: its gate.value tag, else (versions gated before the tag existed)
    the metric of its run."""
    tags = model_version.tags or {}
    if tags.get("gate.metric") == key:
        return float(tags["gate.value"])
    if model_version.run_id:
        return client.get_run(model_version.run_id).data.metrics.get(key)
    return None


def _set_alias(client: MlflowClient, model_name: str, version: str, attempts: int = 5) -> None:
    """Set the alias; a concurrent write of the same alias can fail on the server, so retry."""
    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(model_name, CHAMPION, str(version))
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _settle(client: MlflowClient, model_name: str, key: str, beats, rounds: int = 5) -> str:
    """Put the alias on the best eligible version (ties: the earliest) and return its number."""
    holder = _alias_holder(client, model_name)
    for _ in range(rounds):
        best = None
        for mv in client.search_model_versions(f"name='{model_name}'"):
            tags = mv.tags or {}
            if tags.get("gate.metric") != key or tags.get("gate.eligible") != "true":
                continue
            candidate = (float(tags["gate.value"]), int(mv.version))
            if (
                best is None
                or beats(candidate[0], best[0])
                or (candidate[0] == best[0] and candidate[1] < best[1])
            ):
                best = candidate
        if holder is not None and (best is None or str(best[1]) == str(holder.version)):
            return str(holder.version)
        if best is None:
            return ""
        if holder is not None and (holder.tags or {}).get("gate.metric") != key:
            value = _gate_value(client, holder, key)  # a champion from before gate tags
            if value is not None and not beats(best[0], value):
                return str(holder.version)
        _set_alias(client, model_name, str(best[1]))
        holder = _alias_holder(client, model_name)
    return str(holder.version) if holder is not None else ""
