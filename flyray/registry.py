"""MLflow tracking location and the champion gate that every workload registers through.

Tracking: MLFLOW_TRACKING_URI when set; otherwise an embedded store, sqlite plus a local
artifact directory under the project's data directory (FLYRAY_DATA_DIR, default ./.data).

Registration (`register`, the one path every workload takes): one MLflow run with the run's
parameters, curves, metrics and lineage; the model logged with its flavor; then, if the model
name already holds another task (`TaskIdentity`: what is predicted, from what, judged by which
metric), the model stays in the run but is not registered under that name, and the reason says
how to register it; otherwise a new version and the champion gate.

The gate: a new version takes the alias "champion" only if it beats the baseline it was evaluated
against, and the current champion scored on the new version's own held-out split (same metric,
same users or rows); otherwise it stays registered, tagged with why it was not promoted. Every
decision is tagged on the version. Gates on one model take turns (`gate_lock`).

Identities: on a cluster the MLflow server authenticates every client (flyray/registry_auth.py).
A task logs and registers as the pipeline identity of its pod; the gate's writes (the alias, the
`gate.*`/`promotion*` tags and its lock) go out as the gate identity (`register(gate=...)`), the
only one the server lets move an alias.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flyray import drift
from flyray.lineage import Lineage

log = logging.getLogger(__name__)
CHAMPION = "champion"
DRIFT_PROFILE = "drift/profile.json"  # the run's data profile, what later runs are measured against
# Version tags that only the gate writes (the server refuses them from any other identity): the
# gate trusts a champion's gate.value, so no pipeline may forge them.
GATE_TAG_PREFIXES = ("gate.", "promotion")


@dataclass(frozen=True)
class Credentials:
    """An MLflow identity (a Flyte secret on a cluster); the password never prints."""

    username: str
    password: str = field(repr=False)


@contextmanager
def acting_as(identity: Credentials | None) -> Iterator[None]:
    """MLflow's REST client reads MLFLOW_TRACKING_USERNAME/PASSWORD on every request (its
    documented variables), so the calls inside go out as `identity`; None: as the process."""
    if identity is None:
        yield
        return
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(zip(names, (identity.username, identity.password), strict=True))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
class RegistryConfig:
    """Where a workload's models go and what its champion gate compares (higher is better);
    `drift_threshold`: the PSI past which the data counts as drifted from the champion's
    (flyray.drift); `hold_on_drift`: then keep the champion, whatever the metrics say."""

    model_name: str
    experiment: str
    metric: str
    drift_threshold: float = 0.2
    hold_on_drift: bool = False


@dataclass
class TaskIdentity:
    """What a model is for: versions of one registered model compete only when this is equal.

    `target`: what it predicts (label column, class names, next interactions); `inputs`: what it
    reads (feature schema, image shape, embedding model); `source`: for a recommender, the source
    as configured (a template before it is filled, so nightly windows are one task); `settings`:
    configuration that changes the task's meaning (e.g. feature weights), as JSON.
    """

    workload: str
    target: str
    inputs: str
    metric: str
    source: str = ""
    settings: str = ""

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        parts = [f"{self.workload}: predicts {self.target} from {self.inputs}", f"by {self.metric}"]
        if self.source:
            parts.append(f"source {self.source}")
        return ", ".join(parts)


@dataclass
class RunRecord:
    """What a registration logs besides the model: parameters, final metrics, per-step curves
    (step -> metrics) and JSON documents (artifact name -> content)."""

    params: dict[str, object] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[int, dict[str, float]] = field(default_factory=dict)
    documents: dict[str, object] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # local files logged as artifacts

    def log(self) -> None:
        """Into the active MLflow run, all but the final metrics (`log_metrics`, once the model
        is logged)."""
        if self.params:
            mlflow.log_params(self.params)
        for step, values in sorted(self.curves.items()):
            mlflow.log_metrics({k: v for k, v in values.items() if v == v}, step=step)
        for name, content in self.documents.items():
            mlflow.log_dict(content, name)
        for path in self.files:
            mlflow.log_artifact(path)

    def log_metrics(self, model_id: str) -> None:
        """The final metrics into the active run and onto the logged model `model_id` (its
        LoggedModel metrics, which the registry shows on the model version). NaN metrics are
        left out: MLflow cannot plot them."""
        mlflow.log_metrics(
            {k: float(v) for k, v in self.metrics.items() if v == v}, model_id=model_id
        )


@dataclass
class Registration:
    """Where a registration's MLflow run is, and the champion gate's decision: the output of
    every workload's register task."""

    tracking_uri: str
    run_id: str
    decision: GateDecision
    lineage: dict[str, str] = field(default_factory=dict)  # the lineage.* tags (flyray.lineage)
    drift: dict[str, float] = field(default_factory=dict)  # PSI per distribution vs the champion
    drift_summary: str = ""  # one line: against which version, the largest PSI, the verdict
    drift_threshold: float = 0.2

    def deck(self) -> list[str]:
        from flyray import decks

        parts = [decks.table_html(asdict(self.decision), "Champion gate")]
        if self.drift:
            parts.append(drift.chart_html(self.drift, self.drift_threshold, self.drift_summary))
        if self.lineage:
            where = "on the MLflow run and the model version as lineage.* tags; data as inputs"
            parts.append(decks.table_html(self.lineage, f"Lineage ({where})"))
        return parts


def champion_gate(
    model_name: str,
    version: str,
    metric: str,
    value: float,
    baseline_value: float | None = None,
    higher_is_better: bool = True,
    client: MlflowClient | None = None,
    champion_value: float | None = None,
    champion_version: str | None = None,
    hold: str = "",
) -> GateDecision:
    """Move the champion alias to `version` if it beats the champion and the baseline.

    `champion_value`: the champion scored on this version's own held-out split (what `register`
    passes, so the gate compares two numbers measured on the same data); None falls back to
    the figure recorded when the champion was gated. `champion_version`: the version it scored
    ("" for none); if the alias has moved since, ChampionMoved is raised and nothing is written,
    so that the caller scores the new champion (`register` does). `hold`: why the champion
    stays whatever the figures say (the data drifted, with `hold_on_drift`).

    Safe when pipelines finish at once: the whole decision, from reading the champion to
    moving the alias, runs under the model's gate lock (`gate_lock`), so gates on one model
    take turns and each compares itself with the champion the one before it left.
    """
    client = client or MlflowClient(tracking_uri())
    key = metric_key(metric)

    def beats(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    with gate_lock(client, model_name):
        champion = _alias_holder(client, model_name)
        holder = str(champion.version) if champion is not None else ""
        if champion_version is not None and holder != str(champion_version):
            raise ChampionMoved(model_name, str(champion_version), holder)
        if champion is not None and champion_value is None:
            champion_value = _gate_value(client, champion, key)
        failures = [hold] if hold else []
        if baseline_value is not None and not beats(value, baseline_value):
            failures.append(
                f"{metric} {value:.4f} does not beat the baseline's {baseline_value:.4f}"
            )
        against = "no champion yet"
        if champion_value is not None:
            against = f"champion v{holder}'s {champion_value:.4f} on the same data"
            if not beats(value, champion_value):
                failures.append(f"{metric} {value:.4f} does not beat {against}")
        promoted = not failures
        baseline = f" and the baseline's {baseline_value:.4f}" if baseline_value is not None else ""
        reason = "; ".join(failures) or f"{metric} {value:.4f} beats {against}{baseline}"
        for tag, text in (("gate.metric", key), ("gate.value", repr(float(value))),
                          ("gate.champion", holder), ("gate.champion_value", repr(champion_value)),
                          ("promotion", "champion" if promoted else "rejected"),
                          ("promotion_reason", reason)):  # fmt: skip
            client.set_model_version_tag(model_name, version, tag, text)
        if promoted:
            client.set_registered_model_alias(model_name, CHAMPION, str(version))
    log.info("registry: %s v%s %s: %s", model_name, version,
             "promoted" if promoted else "not promoted", reason)  # fmt: skip
    return GateDecision(
        model_name, str(version), metric, value, promoted, reason, holder, champion_value,
        baseline_value,
    )  # fmt: skip


GATE_LOCK_SUFFIX = ".gate-lock"
GATE_LOCK_WAIT_S = 300.0  # how long a gate waits its turn (each turn is a few requests)
GATE_LOCK_STALE_S = 120.0  # a lock older than this was left by a gate that died: broken


@contextmanager
def gate_lock(
    client: MlflowClient,
    model_name: str,
    wait_s: float = GATE_LOCK_WAIT_S,
    stale_s: float = GATE_LOCK_STALE_S,
) -> Iterator[None]:
    """Hold `<model_name>.gate-lock`, so gates on one model take turns.

    MLflow has no compare-and-set, but creating a registered model is atomic (its name is the
    store's key: a second create fails RESOURCE_ALREADY_EXISTS), so the lock is a registered
    model that exists while a gate holds it. Only the gate's identity may create or delete one
    (flyray.registry_auth). A lock older than `stale_s` was left by a gate that died and is
    broken; that step and the release (which deletes only its own lock) are not atomic, but a
    gate's turn takes well under a second, a small fraction of `stale_s`.
    """
    lock, token = model_name + GATE_LOCK_SUFFIX, uuid.uuid4().hex
    deadline, pause = time.monotonic() + wait_s, 0.05
    while True:
        try:
            client.create_registered_model(
                lock, {"token": token}, f"held by a champion gate on {model_name}"
            )
            break
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        _break_if_stale(client, lock, stale_s)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{model_name}: another champion gate has held {lock} for over {wait_s:.0f} s; "
                "the version stays registered, unpromoted: run the gate again"
            )
        time.sleep(pause + random.uniform(0, pause))
        pause = min(pause * 2, 1.0)
    try:
        yield
    finally:
        with suppress(MlflowException):  # unless it was broken as stale meanwhile
            if client.get_registered_model(lock).tags.get("token") == token:
                client.delete_registered_model(lock)


def _break_if_stale(client: MlflowClient, lock: str, stale_s: float) -> None:
    try:
        held = client.get_registered_model(lock)
    except MlflowException:
        return  # released meanwhile
    age_s = time.time() - held.creation_timestamp / 1000
    if age_s > stale_s:
        log.warning("registry: breaking %s, held %.0f s by a gate that never released it",
                    lock, age_s)  # fmt: skip
        with suppress(MlflowException):  # another waiter broke it first
            client.delete_registered_model(lock)


class ChampionMoved(RuntimeError):
    """The alias moved while the challenger scored the champion it found."""

    def __init__(self, model_name: str, scored: str, holder: str) -> None:
        super().__init__(f"{model_name}: champion moved from v{scored or '-'} to v{holder or '-'}")
        self.holder = holder


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


TASK_KEY, TASK_TEXT = "task.key", "task"


@dataclass
class Candidate:
    """A trained model ready for the registry, as its workload describes it: what task it is,
    what its run records, how it is logged (`log_model(name)`: registered under `name`, or only
    logged when None), its gate value and baseline, and how to score the champion (a models:/
    URI) on this model's own held-out split."""

    identity: TaskIdentity
    record: RunRecord
    log_model: Callable[[str | None], object]
    value: float
    baseline_value: float | None
    score_champion: Callable[[str], float]
    # the training data to profile for drift (flyray.drift): distribution name -> values
    columns: dict[str, drift.Column] = field(default_factory=dict)


def register(
    config: RegistryConfig,
    candidate: Candidate,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
    gate: Credentials | None = None,
    lineage: Lineage | None = None,
) -> Registration:
    """The one registration path: the candidate's record into a run (a new one, or `run_id`
    continued), its model logged, then the gate on its value, with the champion scored on the
    candidate's own held-out split. A model of another task is logged but not registered.
    `gate`: the identity the gate's writes go out as (None: this process's own); `lineage`: what
    produced it, recorded on the run and on the version (flyray.lineage)."""
    use_experiment(config.experiment)
    client = MlflowClient(tracking_uri())
    identity, value = candidate.identity, candidate.value
    task_tags = {TASK_KEY: identity.key(), TASK_TEXT: identity.describe()}
    with mlflow.start_run(run_id=run_id, tags={**(tags or {}), **task_tags}) as run:
        candidate.record.log()
        if candidate.columns:
            mlflow.log_dict(drift.to_json(drift.profile(candidate.columns)), DRIFT_PROFILE)
        if lineage is not None:
            lineage.log()
        lineage_tags = lineage.tags() if lineage is not None else {}
        conflict = _other_task(client, config, identity)
        measured = None
        if conflict:
            info = candidate.log_model(None)  # kept in the run, so nothing trained is lost
            candidate.record.log_metrics(info.model_id)
            decision = GateDecision(config.model_name, "", config.metric, value, False, conflict)
            log.warning("registry: %s", conflict)
        else:
            info = candidate.log_model(config.model_name)
            candidate.record.log_metrics(info.model_id)
            version = str(info.registered_model_version)
            for tag, text in {**task_tags, **lineage_tags}.items():
                client.set_model_version_tag(config.model_name, version, tag, text)
            decision, measured = _gate_on_the_current_champion(
                client, config, candidate, version, gate
            )
        mlflow.set_tags({"promotion": "champion" if decision.promoted else "rejected",
                         "promotion_reason": decision.reason})  # fmt: skip
    return Registration(
        tracking_uri(), run.info.run_id, decision, lineage_tags,
        measured.psi if measured else {}, measured.summary() if measured else "",
        config.drift_threshold,
    )  # fmt: skip


MAX_RESCORES = 5  # champions that may move under one registration before it gives up


def _gate_on_the_current_champion(
    client: MlflowClient,
    config: RegistryConfig,
    candidate: Candidate,
    version: str,
    gate: Credentials | None = None,
) -> tuple[GateDecision, drift.Drift | None]:
    """Score the champion on the candidate's split, measure the data's drift from the
    champion's, and gate; when another pipeline moved the alias while it scored (scoring takes
    minutes), score the new champion and gate again."""
    for _ in range(MAX_RESCORES):
        champion = _alias_holder(client, config.model_name)
        scored = str(champion.version) if champion is not None else ""
        champion_value = (
            candidate.score_champion(f"models:/{config.model_name}/{scored}") if scored else None
        )
        measured = _drift(config, candidate, champion) if champion is not None else None
        hold = ""
        if measured is not None:
            mlflow.log_dict({"against": scored, "psi": measured.psi}, "drift/psi.json")
            for tag, text in measured.tags().items():
                client.set_model_version_tag(config.model_name, version, tag, text)
            if config.hold_on_drift and measured.drifted:
                hold = f"{measured.summary()}; hold_on_drift keeps the champion"
        try:
            with acting_as(gate):
                decision = champion_gate(
                    config.model_name, version, config.metric, candidate.value,
                    candidate.baseline_value, client=client, champion_value=champion_value,
                    champion_version=scored, hold=hold,
                )  # fmt: skip
            return decision, measured
        except ChampionMoved as moved:
            log.info("registry: %s; scoring v%s on this split", moved, moved.holder)
    raise RuntimeError(
        f"{config.model_name}: the champion moved {MAX_RESCORES} times while v{version} was "
        "being gated; it stays registered, unpromoted: run the gate again"
    )


def _drift(config: RegistryConfig, candidate: Candidate, champion) -> drift.Drift | None:
    """The candidate's data against the profile its champion was registered with (None: no
    data to profile, or a champion registered before profiles were kept)."""
    if not candidate.columns or not champion.run_id:
        return None
    try:
        reference = mlflow.artifacts.load_dict(f"runs:/{champion.run_id}/{DRIFT_PROFILE}")
    except (MlflowException, OSError):
        return None
    return drift.compare(
        drift.from_json(reference), candidate.columns, str(champion.version),
        config.drift_threshold,
    )  # fmt: skip


def _other_task(client: MlflowClient, config: RegistryConfig, identity: TaskIdentity) -> str:
    """Why this model may not join `config.model_name` ("" if it may): the name already holds
    versions of another task. Versions from before task identities count as compatible."""
    try:
        versions = client.search_model_versions(f"name='{config.model_name}'")
    except MlflowException:
        return ""
    key = identity.key()
    for mv in sorted(versions, key=lambda v: -int(v.version)):
        tags = mv.tags or {}
        if tags.get(TASK_KEY, key) != key:
            return (
                f"not registered: '{config.model_name}' holds another task (v{mv.version}: "
                f"{tags.get(TASK_TEXT, '?')}); this model is {identity.describe()}. Its champion "
                f"stays. Register this one under its own name, e.g. --registration "
                f'\'{{"model_name": "{config.model_name}-{identity.key()[:6]}", '
                f'"experiment": "{config.experiment}", "metric": "{config.metric}"}}\''
            )
    return ""
