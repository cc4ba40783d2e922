"""Where a task's outputs, checkpoints, decks and registrations go inside a Flyte execution."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import socket
import time
from dataclasses import asdict, is_dataclass

from flytekit import Deck, ImageSpec, Secret, StructuredDataset
from flytekit import current_context as _current_context
from flytekit.core.context_manager import FlyteContextManager
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from flyray import console, registry, ui
from flyray.lineage import DataInput, Lineage, file_digest
from flyray.raytrain import DistributedConfig
from flyray.registry import Candidate, RegistryConfig
from tasks.deployment import Deployment, current

GATE_KEYS = ("username", "password")


def register(
    config: RegistryConfig,
    candidate: Candidate,
    image: ImageSpec,
    data: tuple[DataInput, ...],
    recipe: str,
    run_id: str | None = None,
):
    """flyray.registry.register with the execution's lineage (the code registered, the task's
    image and its locked requirements, `data` with digests, the workflow's `recipe`: its
    inputs, tasks/recipe.py), the gate's writes as the gate's identity; the decision becomes a
    deck."""
    tags = execution_tags(candidate.identity.workload)
    execution = "/".join((tags["flyte.project"], tags["flyte.domain"], tags["flyte.execution_id"]))
    if tags["flyte.execution_id"] == "local":  # every local run is "local": name this one
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        execution += f"/{socket.gethostname()}/pid-{os.getpid()}@{now}"
    lineage = Lineage(
        execution, current().code_version, image.image_name(),
        file_digest(image.requirements), data, recipe,
    )  # fmt: skip
    registration = registry.register(
        config, candidate, tags, run_id, gate=gate_identity(), lineage=lineage
    )
    publish("registry", *registration.deck())
    return registration


def gate_secrets(deploy: Deployment | None = None) -> list[Secret]:
    """The gate's MLflow identity as Flyte secret files, requested by the register tasks only
    (`flyray_task(gate=True)`), so no other pod holds it."""
    group = (deploy or current()).gate_secret_group
    if not group:
        return []
    mount = Secret.MountType.FILE
    return [Secret(group=group, key=key, mount_requirement=mount) for key in GATE_KEYS]


def gate_identity() -> registry.Credentials | None:
    """The gate's identity where Flyte mounted it (a cluster); None elsewhere (`pyflyte run`,
    whose embedded store authenticates nobody): the gate then acts as the process does."""
    group = current().gate_secret_group
    if not group:
        return None
    secrets = _current_context().secrets
    try:
        return registry.Credentials(*(secrets.get(group, key) for key in GATE_KEYS))
    except ValueError:
        return None


def new_output_dir() -> str:
    """A fresh directory under the execution's raw-output prefix (s3:// on a cluster)."""
    return FlyteContextManager.current_context().file_access.get_random_remote_directory()


_ATTEMPT_OUTPUTS = re.compile(r"/([^/]+)/data/\d+/?$")  # <node-id>/data/<attempt>


def checkpoint_uri(config: DistributedConfig, name: str, inputs: dict | None = None) -> str:
    """Where this task's checkpoints go: `config.checkpoint_uri` when set, else a folder that
    every Flyte retry of the same node of the same execution derives alike, so a retry resumes
    from the failed attempt's last checkpoint:
      <root>/<project>/<domain>/<execution>/<node id>/<name>
    root: the deployment's FLYRAY_CHECKPOINT_ROOT, else `flyray-checkpoints` beside the
    raw-output prefix (its bucket on a cluster). The node id comes from the attempt's output prefix
    (.../<node>/data/<attempt>); where that has no node id (local runs), a digest of the
    task's inputs stands in for it."""
    if config.checkpoint_uri:
        return config.checkpoint_uri
    params = _current_context()
    root = current().checkpoint_root or _beside(params.raw_output_prefix)
    execution = params.execution_id
    match = _ATTEMPT_OUTPUTS.search(params.output_metadata_prefix or "")
    node = match.group(1) if match else "in-" + _digest(inputs or {})
    parts = (execution.project, execution.domain, execution.name, node, name)
    return posixpath.join(root, *parts) if "://" in root else os.path.join(root, *parts)


def _beside(raw_output_prefix: str) -> str:
    """The bucket of an object-store prefix; locally the folder above Flyte's per-attempt
    <shard>/<attempt id> folders."""
    if "://" in raw_output_prefix:
        scheme, rest = raw_output_prefix.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}/flyray-checkpoints"
    base = os.path.dirname(os.path.dirname(raw_output_prefix.rstrip("/")))
    return os.path.join(base, "flyray-checkpoints")


def _digest(inputs: dict) -> str:
    def plain(value):
        if isinstance(value, StructuredDataset | FlyteDirectory | FlyteFile):
            return uri(value)
        return asdict(value) if is_dataclass(value) else value

    text = json.dumps({k: plain(v) for k, v in inputs.items()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def uri(value: StructuredDataset | FlyteDirectory | FlyteFile) -> str:
    """Where a dataset, directory or file input lives, without downloading it (Ray workers read
    it in place; its literal carries the location)."""
    if isinstance(value, StructuredDataset):
        return value.uri or value.literal.uri
    return value.remote_source or value.path


def publish(name: str, *parts: str) -> None:
    """One Flyte deck tab from HTML fragments (flyray's reports build them), marked with the
    task's name for the local deck index (flyray.ui)."""
    mark = f"<!-- {ui.TASK_MARK} {console.current_task()} -->"
    Deck(name, "\n".join((mark, *parts)))


def execution_tags(workload: str) -> dict[str, str]:
    """Lineage of an MLflow run: the Flyte execution that made it."""
    execution = _current_context().execution_id
    return {
        "flyte.execution_id": execution.name,
        "flyte.project": execution.project,
        "flyte.domain": execution.domain,
        "workload": workload,
    }
