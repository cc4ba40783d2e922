"""What each MLflow identity may do, asked of the server itself (flyray/registry_auth.py): every
request goes out through MLflow's own client, as the identity the Secrets give, and the table
shows what it was allowed and refused. The rehearsal runs it against the Postgres-backed server by
its Service name after the pipeline registered `model`; tests/test_registry_auth.py against a
server of its own.

A probe model (`<model>-identity-probe`, created by the pipeline identity) takes the writes that
must succeed, so the registered model keeps its versions and champion; on `model` only reads and
refusals are asked.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flyray.registry import CHAMPION, GATE_LOCK_SUFFIX, Credentials, acting_as, gate_lock
from flyray.registry_auth import GATE, PEOPLE, PIPELINE, SERVING

ANONYMOUS = "anonymous"


@dataclass
class Check:
    identity: str
    action: str
    expected: str  # allowed | refused
    outcome: str = ""  # allowed | refused (<status>: <message>) | error

    @property
    def passed(self) -> bool:
        return self.outcome.split(" ", 1)[0] == self.expected


def check(uri: str, passwords: Mapping[str, str], model: str) -> list[Check]:
    """Ask the server at `uri` what each identity (its password in `passwords`) may do."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    probe = f"{model}-identity-probe"
    state: dict[str, str] = {}

    def as_(identity: str) -> Credentials:
        return Credentials("", "") if identity == ANONYMOUS else Credentials(
            identity, passwords[identity]
        )  # fmt: skip

    def run_and_version() -> None:
        experiment = client.create_experiment(f"{probe}-{uuid.uuid4().hex[:8]}")
        state["run"] = client.create_run(experiment).info.run_id
        client.create_registered_model(probe)
        state["version"] = register(probe)

    def register(name: str) -> str:
        run = state["run"]
        return client.create_model_version(name, f"runs:/{run}/model", run_id=run).version

    def gate_tag(name: str, version: str) -> None:
        client.set_model_version_tag(name, version, "gate.value", "1e9")

    def champion_of(name: str):
        return client.get_model_version_by_alias(name, CHAMPION)

    def move(name: str, version: Callable[[], str]) -> None:
        client.set_registered_model_alias(name, CHAMPION, version())

    def take_and_release_the_lock() -> None:
        with gate_lock(client, probe, wait_s=10):
            pass

    steps: list[tuple[str, str, str, Callable[[], object]]] = [
        (ANONYMOUS, "read the registry", "refused", lambda: client.search_registered_models()),
        (PEOPLE, "read the registry", "allowed", lambda: client.search_registered_models()),
        (PEOPLE, "create an experiment", "refused",
         lambda: client.create_experiment(f"people-{uuid.uuid4().hex[:8]}")),
        (PIPELINE, "log a run, create a model, register a version", "allowed", run_and_version),
        (PIPELINE, "write the gate's tag", "refused", lambda: gate_tag(probe, state["version"])),
        (PIPELINE, "move the alias of the model it created", "refused",
         lambda: move(probe, lambda: state["version"])),
        (PIPELINE, f"move {model}'s alias", "refused",
         lambda: move(model, lambda: champion_of(model).version)),
        (PIPELINE, "delete the model it created", "refused",
         lambda: client.delete_registered_model(probe)),
        (GATE, "write the gate's tag", "allowed", lambda: gate_tag(probe, state["version"])),
        (GATE, "move the alias", "allowed", lambda: move(probe, lambda: state["version"])),
        (GATE, "take and release the gate's lock", "allowed", take_and_release_the_lock),
        (GATE, "create a registered model", "refused",
         lambda: client.create_registered_model(f"{probe}-gate")),
        (PIPELINE, "take the gate's lock", "refused",
         lambda: client.create_registered_model(probe + GATE_LOCK_SUFFIX)),
        (SERVING, f"load {model}'s champion", "allowed", lambda: champion_of(model)),
        (SERVING, f"register a version of {model}", "refused", lambda: register(model)),
        (SERVING, f"move {model}'s alias", "refused",
         lambda: move(model, lambda: champion_of(model).version)),
        (SERVING, "create a registered model", "refused",
         lambda: client.create_registered_model(f"{probe}-serving")),
    ]  # fmt: skip
    checks = []
    for identity, action, expected, step in steps:
        with acting_as(as_(identity)):
            outcome = _outcome(step)
        checks.append(Check(identity, action, expected, outcome))
    return checks


def _outcome(step: Callable[[], object]) -> str:
    """allowed, or refused (status: the server's reason), or error (anything else)."""
    from mlflow.exceptions import MlflowException

    try:
        step()
    except MlflowException as err:
        text = str(err)
        status = re.search(r"error code (\d+)|^(\d{3})", text)
        code = next((g for g in status.groups() if g), "") if status else ""
        if code in ("401", "403"):
            reason = re.search(r"Response body: '(.*?)'?$", text, re.S)
            return f"refused ({code}: {(reason.group(1) if reason else text).strip()[:80]})"
        return f"error {text[:200]}"
    return "allowed"


def table(checks: list[Check]) -> str:
    width = max(len(c.identity) for c in checks)
    what = max(len(c.action) for c in checks)
    lines = [f"{'identity':<{width}}  {'action':<{what}}  {'expected':<8}  outcome"]
    for c in checks:
        mark = "" if c.passed else "   <-- NOT AS EXPECTED"
        row = f"{c.identity:<{width}}  {c.action:<{what}}  {c.expected:<8}  {c.outcome}"
        lines.append(row + mark)
    return "\n".join(lines)
