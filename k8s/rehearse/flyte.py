"""A Flyte execution of what `make package` serialized, node by node, as propeller runs it:
each node's inputs.pb built from its bindings (workflow inputs, upstream outputs) and written to
the metadata bucket, its container args' templates filled with s3:// prefixes in Flyte's layout,
`{{ .remote_package_path }}` the fast-registration archive uploaded as flytectl uploads it; a Ray
task becomes the RayJob that Flyte's Ray plugin creates (k8s.check.flyte_rayjob), run on a real
Ray cluster and torn down after; any other task a process with its pod's environment (the
default PodTemplate of flyte-binary's values, the task's env, propeller's FLYTE_INTERNAL_*).
A recoverable error (error.pb, kind RECOVERABLE) or a lost attempt is retried up to the task's
retries; a @dynamic's futures.pb is executed sub-node by sub-node and its outputs bound.
What propeller does and this does not: caching (every node runs), admin, scheduling.
"""

from __future__ import annotations

import random
import re
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from flyteidl.admin import launch_plan_pb2, task_pb2, workflow_pb2
from flyteidl.core import dynamic_job_pb2, errors_pb2, literals_pb2
from flyteidl.core import workflow_pb2 as core_wf

from k8s import check
from k8s.rehearse.pods import (
    IMAGE_PATH,
    Objects,
    Process,
    RehearsalError,
    declares_read_only_root,
    pod_paths,
)
from k8s.rehearse.raycluster import RayCluster

PROJECT, DOMAIN = "flyray", "development"
TASK_NAMESPACE = f"{PROJECT}-{DOMAIN}"


class Package:
    """The archive of `make package`: task specs, workflow specs, launch plans, fast archive."""

    def __init__(self, archive: Path):
        self.tasks: dict[str, object] = {}
        self.workflows: dict[str, workflow_pb2.WorkflowSpec] = {}
        self.launch_plans: dict[str, launch_plan_pb2.LaunchPlan] = {}
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read() if member.isfile() else b""
                name = member.name.removeprefix("./")
                if name.startswith("fast") and name.endswith(".tar.gz"):
                    self.fast_name, self.fast = name, data
                elif name.endswith("_1.pb"):
                    spec = task_pb2.TaskSpec.FromString(data)
                    self.tasks[spec.template.id.name] = spec.template
                elif name.endswith("_2.pb"):
                    spec = workflow_pb2.WorkflowSpec.FromString(data)
                    self.workflows[spec.template.id.name] = spec
                elif name.endswith("_3.pb"):
                    plan = launch_plan_pb2.LaunchPlan.FromString(data)
                    self.launch_plans[plan.id.name] = plan
        if not hasattr(self, "fast"):
            raise RehearsalError(f"{archive}: no fast-registration archive (make package --fast)")


class Store:
    """The metadata and raw-output bucket, reached as the pods reach it."""

    def __init__(self, client, bucket: str):
        self.client, self.bucket = client, bucket

    def _key(self, uri: str) -> str:
        prefix = f"s3://{self.bucket}/"
        if not uri.startswith(prefix):
            raise RehearsalError(f"{uri} is not in bucket {self.bucket}")
        return uri[len(prefix) :]

    def put(self, uri: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(uri), Body=data)

    def get(self, uri: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(uri))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def keys(self, uri: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(uri)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@dataclass
class Row:
    """One line of the summary: a node, how it ran, how long, how it ended."""

    node: str
    how: str
    seconds: float
    outcome: str


@dataclass
class Attempt:
    status: str  # succeeded | recoverable | failed | lost
    message: str = ""
    dynamic: dynamic_job_pb2.DynamicJobSpec | None = None


class NodeFailed(RehearsalError):
    pass


@dataclass
class Execution:
    """One execution of a workflow of `package`, its nodes run on the rehearsal's stack."""

    package: Package
    store: Store
    objects: Objects
    hosts: object
    root: Path
    workflow: str
    name: str = field(default_factory=lambda: "f" + f"{random.getrandbits(76):019x}")
    rows: list[Row] = field(default_factory=list)
    outputs: dict[str, literals_pb2.LiteralMap] = field(default_factory=dict)  # by task name
    # Called about once a second while a node runs: hook(execution, node, task name, attempt,
    # seconds since the attempt began, its Ray cluster or None); the fault rehearsals use it.
    hook: object = None

    def __post_init__(self) -> None:
        self.meta = f"s3://{self.store.bucket}/metadata/propeller/{PROJECT}-{DOMAIN}-{self.name}"
        self.fast_uri = f"s3://{self.store.bucket}/{PROJECT}/{DOMAIN}/{self.package.fast_name}"
        self.store.put(self.fast_uri, self.package.fast)
        self.plugin = check.flyte_values()["configuration"]["inline"]["plugins"]["ray"]
        values = check.flyte_values()
        [defaults] = [
            t
            for t in check.cluster_resource_templates(values, TASK_NAMESPACE)
            if t["kind"] == "PodTemplate"
        ]
        self.objects.add(check.cluster_resource_templates(values, TASK_NAMESPACE))
        [self.default_container] = defaults["template"]["spec"]["containers"]

    # -------------------------------------------------------------------------- workflows

    def run(self, inputs: literals_pb2.LiteralMap, until: str = "") -> literals_pb2.LiteralMap:
        """Every node, or with `until` (a task's short name) only the node that runs it and the
        nodes it needs; then the outputs of that node, not the workflow's."""
        spec = self.package.workflows[self.workflow]
        subs = {w.id.name: w for w in spec.sub_workflows}
        return self._workflow(spec.template, inputs, "", subs, until)

    def _workflow(self, template: core_wf.WorkflowTemplate, inputs, parent: str, subs, until=""):
        outputs: dict[str, literals_pb2.LiteralMap] = {"": inputs, "start-node": inputs}
        pending = list(template.nodes)
        if until:
            [target] = [n for n in pending if _task_name(n) == until]
            pending = _with_upstream(target, pending)
        kept = {n.id for n in pending}
        while pending:
            ready = [n for n in pending if all(d in outputs or d not in kept for d in _needs(n))]
            if not ready:
                raise RehearsalError(
                    f"{template.id.name}: nodes {[n.id for n in pending]} wait on each other"
                )
            node = ready[0]
            pending.remove(node)
            node_inputs = bind(node.inputs, outputs)
            unique = f"{parent}-0-{node.id}" if parent else node.id
            kind = node.WhichOneof("target")
            if kind == "task_node":
                outputs[node.id] = self.task(unique, node.task_node.reference_id.name, node_inputs)
            elif kind == "workflow_node" and node.workflow_node.HasField("sub_workflow_ref"):
                sub = subs[node.workflow_node.sub_workflow_ref.name]
                outputs[node.id] = self._workflow(sub, node_inputs, unique, subs)
            else:
                raise RehearsalError(
                    f"{template.id.name}.{node.id}: {kind} nodes are not rehearsed"
                )
        return outputs[target.id] if until else bind(template.outputs, outputs)

    # -------------------------------------------------------------------------- tasks

    def task(
        self, node: str, task: str, inputs: literals_pb2.LiteralMap, template=None
    ) -> literals_pb2.LiteralMap:
        template = template or self.package.tasks[task]
        short = task.split(".")[-1]
        self.store.put(f"{self.meta}/{node}/data/inputs.pb", inputs.SerializeToString())
        retries = template.metadata.retries.retries
        began, failures = time.monotonic(), []
        for attempt in range(retries + 1):
            how, result = self._attempt(node, template, attempt)
            if result.status == "succeeded":
                break
            failures.append(f"attempt {attempt}: {result.status}: {_short(_gist(result.message))}")
            if result.status == "failed":
                break
        seconds = time.monotonic() - began
        if result.status != "succeeded":
            self._row(Row(f"{node} {short}", how, seconds, "FAILED; " + "; ".join(failures)))
            raise NodeFailed(f"{node} {short} failed: {'; '.join(failures)}")
        outcome = "succeeded" + (
            f" on attempt {attempt} ({'; '.join(failures)})" if attempt else ""
        )
        self._row(Row(f"{node} {short}", how, seconds, outcome))
        if result.dynamic is not None:
            found = self._dynamic(node, result.dynamic, attempt)
        else:
            found = literals_pb2.LiteralMap.FromString(
                self.store.get(f"{self.output_prefix(node, attempt)}/outputs.pb")
            )
        self.outputs[short] = found
        return found

    def _row(self, row: Row) -> None:
        """Kept for the summary, and one line now: the rehearsal runs for minutes."""
        self.rows.append(row)
        line = f"{row.node}: {_short(row.outcome, 100)} ({row.how}, {row.seconds:.0f} s)"
        print(line, flush=True)

    def output_prefix(self, node: str, attempt: int) -> str:
        return f"{self.meta}/{node}/data/{attempt}"

    def raw_prefix(self, node: str, attempt: int) -> str:
        shard = f"{zlib.crc32(f'{self.name}-{node}-{attempt}'.encode()) % 256:02x}"
        return f"s3://{self.store.bucket}/raw/{shard}/{self.name}-{node}-{attempt}"

    def args(self, template, node: str, attempt: int, pod_root: Path) -> list[str]:
        """The container args with Flyte's templates filled (flytectl: the fast archive;
        propeller: the input, output, raw-output and checkpoint prefixes)."""
        raw = self.raw_prefix(node, attempt)
        values = {
            "{{ .remote_package_path }}": self.fast_uri,
            "{{.input}}": f"{self.meta}/{node}/data/inputs.pb",
            "{{.outputPrefix}}": self.output_prefix(node, attempt),
            "{{.rawOutputDataPrefix}}": raw,
            "{{.checkpointOutputPrefix}}": f"{raw}/_flytecheckpoints",
            "{{.prevCheckpointPrefix}}": (
                f"{self.raw_prefix(node, attempt - 1)}/_flytecheckpoints" if attempt else '""'
            ),
        }
        args = [values.get(a, a) for a in template.container.args]
        if "--dest-dir" in args:  # the image's /root: here, the pod's own folder
            args[args.index("--dest-dir") + 1] = str(pod_root)
        return args

    def flyte_env(self, template, node: str, attempt: int) -> dict[str, str]:
        """What propeller puts in every task container's environment."""
        return {
            "FLYTE_INTERNAL_EXECUTION_WORKFLOW": f"{PROJECT}:{DOMAIN}:{self.workflow}",
            "FLYTE_INTERNAL_EXECUTION_ID": self.name,
            "FLYTE_INTERNAL_EXECUTION_PROJECT": PROJECT,
            "FLYTE_INTERNAL_EXECUTION_DOMAIN": DOMAIN,
            "FLYTE_ATTEMPT_NUMBER": str(attempt),
            "FLYTE_INTERNAL_TASK_PROJECT": PROJECT,
            "FLYTE_INTERNAL_TASK_DOMAIN": DOMAIN,
            "FLYTE_INTERNAL_TASK_NAME": template.id.name,
            "FLYTE_INTERNAL_TASK_VERSION": template.id.version or "rehearsal",
            **{e.key: e.value for e in template.container.env},
        }

    def secrets(self, template, folder: Path) -> dict[str, str]:
        """What Flyte's secret webhook gives the pod for the task's secret requests: the key of
        the Secret its group names, in the task namespace, as a file under the secrets folder
        (FLYTE_SECRETS_DEFAULT_DIR; /etc/flyte/secrets on a cluster) or, for ENV_VAR, as
        _FSEC_<GROUP>_<KEY> and its env_var."""
        env: dict[str, str] = {}
        base = folder / "secrets"
        for secret in template.security_context.secrets:
            value = self.objects.secret(TASK_NAMESPACE, secret.group).get(secret.key)
            if value is None:
                raise RehearsalError(f"Secret {TASK_NAMESPACE}/{secret.group} has no {secret.key}")
            if secret.mount_requirement == secret.ENV_VAR:
                env[f"_FSEC_{secret.group.upper()}_{secret.key.upper()}"] = value
                if secret.env_var:
                    env[secret.env_var] = value
                continue
            path = base / secret.group.lower() / secret.key.lower()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(value)
            path.chmod(0o400)
            env["FLYTE_SECRETS_DEFAULT_DIR"] = str(base)
        return env

    def _attempt(self, node: str, template, attempt: int) -> tuple[str, Attempt]:
        folder = self.root / "pods" / self.name / f"{node}-{attempt}"
        timeout = template.metadata.timeout.seconds or 3600
        if template.type == "ray":
            how, status, log = self._ray(node, template, attempt, folder, timeout)
        else:
            how = "process"
            env = {
                "PATH": IMAGE_PATH,
                "HOME": str(folder / "root"),
                **self.objects.env(self.default_container, TASK_NAMESPACE),
                **self.flyte_env(template, node, attempt),
                **self.secrets(template, folder),
            }
            env = pod_paths(env, folder / "root")
            argv = self.args(template, node, attempt, folder / "root")
            read_only = declares_read_only_root(self.default_container)
            proc = Process(
                node, argv, env, folder / "root", folder / "pod.log", read_only=read_only
            ).start()
            began = time.monotonic()
            try:
                while proc.proc.poll() is None and time.monotonic() - began < timeout:
                    self._hook(node, template, attempt, began, None)
                    time.sleep(1)
                status = {None: "STOPPED", 0: "SUCCEEDED"}.get(proc.proc.poll(), "FAILED")
            finally:
                proc.stop()
            log = proc.tail(60)
        return how, self._result(node, attempt, status, log)

    def _ray(self, node, template, attempt, folder, timeout) -> tuple[str, str, str]:
        job = check.flyte_rayjob(_plugin_view(template), self.plugin)
        rayjob = re.sub(r"[^a-z0-9-]", "-", f"{self.name}-{node}-{attempt}".lower())[:40]
        name = f"{rayjob}-{random.getrandbits(20):05x}"
        cluster = RayCluster(
            name,
            TASK_NAMESPACE,
            job["spec"]["rayClusterSpec"],
            self.objects,
            self.hosts,
            folder,
            self.root / "r",
            self.flyte_env(template, node, attempt),
        )
        how = f"Ray job on {cluster.pods_in_spec} raylets"
        try:
            cluster.start()
            entrypoint = " ".join(self.args(template, node, attempt, folder / "head" / "root"))
            cluster.submit(rayjob, entrypoint)
            began = time.monotonic()
            status = cluster.wait(
                rayjob,
                timeout,
                while_running=lambda c: self._hook(node, template, attempt, began, c),
            )
            log = cluster.logs(rayjob)
        except RehearsalError as err:
            status, log = "LOST", str(err)
        finally:
            cluster.stop()
        return how, status, log

    def _hook(self, node, template, attempt, began, cluster) -> None:
        if self.hook is not None:
            task = template.id.name.split(".")[-1]
            self.hook(self, node, task, attempt, time.monotonic() - began, cluster)

    def _result(self, node: str, attempt: int, status: str, log: str) -> Attempt:
        prefix = self.output_prefix(node, attempt)
        error = self.store.get(f"{prefix}/error.pb")
        if error is not None:
            doc = errors_pb2.ErrorDocument.FromString(error).error
            kind = "recoverable" if doc.kind == errors_pb2.ContainerError.RECOVERABLE else "failed"
            return Attempt(kind, doc.message)
        futures = self.store.get(f"{prefix}/futures.pb")
        if futures is not None:
            return Attempt("succeeded", dynamic=dynamic_job_pb2.DynamicJobSpec.FromString(futures))
        if status == "SUCCEEDED" and self.store.get(f"{prefix}/outputs.pb") is not None:
            return Attempt("succeeded")
        # No error document: the pod or job was lost (a system failure Flyte retries).
        return Attempt("lost", f"{status}, no outputs: {_last_lines(log)}")

    def _dynamic(self, parent: str, spec: dynamic_job_pb2.DynamicJobSpec, attempt: int):
        """Run the sub-nodes a @dynamic returned, then bind its outputs."""
        tasks = {t.id.name: t for t in spec.tasks}
        outputs: dict[str, literals_pb2.LiteralMap] = {}
        pending = list(spec.nodes)
        while pending:
            node = next(n for n in pending if all(d in outputs for d in _needs(n)))
            pending.remove(node)
            name = node.task_node.reference_id.name
            outputs[node.id] = self.task(
                f"{parent}-{attempt}-{node.id}",
                name,
                bind(node.inputs, outputs),
                template=tasks[name],
            )
        result = bind(spec.outputs, outputs)
        self.store.put(
            f"{self.output_prefix(parent, attempt)}/outputs.pb", result.SerializeToString()
        )
        return result


def _plugin_view(template):
    """What Flyte's Ray plugin reads of a task template (flytekit's own model of the whole
    template fails on the NaN that a dataclass input's schema metadata may hold)."""
    from types import SimpleNamespace

    from google.protobuf.json_format import MessageToDict

    container = SimpleNamespace(
        env={e.key: e.value for e in template.container.env},
        args=list(template.container.args),
        image=template.container.image,
    )
    return SimpleNamespace(
        custom=MessageToDict(template.custom),
        container=container,
        id=template.id,
        metadata=template.metadata,
    )


def bind(bindings, outputs: dict[str, literals_pb2.LiteralMap]) -> literals_pb2.LiteralMap:
    """A LiteralMap from bindings: promises read the named node's (or the workflow's) outputs."""
    return literals_pb2.LiteralMap(literals={b.var: _value(b.binding, outputs) for b in bindings})


def _value(data: literals_pb2.BindingData, outputs) -> literals_pb2.Literal:
    kind = data.WhichOneof("value")
    if kind == "scalar":
        return literals_pb2.Literal(scalar=data.scalar)
    if kind == "collection":
        items = [_value(b, outputs) for b in data.collection.bindings]
        return literals_pb2.Literal(collection=literals_pb2.LiteralCollection(literals=items))
    if kind == "map":
        items = {k: _value(b, outputs) for k, b in data.map.bindings.items()}
        return literals_pb2.Literal(map=literals_pb2.LiteralMap(literals=items))
    if kind == "promise":
        literal = outputs[data.promise.node_id].literals[data.promise.var]
        return _attribute(literal, data.promise.attr_path) if data.promise.attr_path else literal
    raise RehearsalError(f"binding of kind {kind} is not rehearsed")


def _task_name(node) -> str:
    return node.task_node.reference_id.name.split(".")[-1] if node.HasField("task_node") else ""


def _with_upstream(target, nodes: list) -> list:
    """`target` and every node whose outputs it needs, directly or not, in their order in
    `nodes` (an ordering-only edge, `a >> b`, brings no node: the CNN's one-process baseline is
    not run before its Ray Train node)."""
    by_id = {n.id: n for n in nodes}
    keep, todo = set(), [target.id]
    while todo:
        node = todo.pop()
        if node in by_id and node not in keep:
            keep.add(node)
            todo += _needs(by_id[node], data_only=True)
    return [n for n in nodes if n.id in keep]


def _attribute(literal: literals_pb2.Literal, path) -> literals_pb2.Literal:
    """`promise.attr` of a dataclass (msgpack) literal, resolved as propeller resolves it: the
    value at the path, again as msgpack (flytekit's transformers read it back)."""
    import msgpack

    binary = literal.scalar.binary
    if binary.tag != "msgpack":
        raise RehearsalError(f"attribute access on a {literal.WhichOneof('value')} literal")
    value = msgpack.unpackb(binary.value)
    for step in path:
        value = value[
            step.string_value if step.WhichOneof("value") == "string_value" else step.int_value
        ]
    packed = literals_pb2.Binary(value=msgpack.packb(value), tag="msgpack")
    return literals_pb2.Literal(scalar=literals_pb2.Scalar(binary=packed))


def _needs(node, data_only: bool = False) -> set[str]:
    """The nodes `node` waits for: those whose outputs it binds, and (unless `data_only`) those
    ordered before it."""
    found: set[str] = set() if data_only else set(node.upstream_node_ids)

    def walk(data):
        kind = data.WhichOneof("value")
        if kind == "promise" and data.promise.node_id not in ("", "start-node"):
            found.add(data.promise.node_id)
        elif kind == "collection":
            for b in data.collection.bindings:
                walk(b)
        elif kind == "map":
            for b in data.map.bindings.values():
                walk(b)

    for b in node.inputs:
        walk(b.binding)
    return found


def _gist(message: str) -> str:
    """The message of a flytekit error document, without its traceback."""
    return message.rsplit("Message:", 1)[-1].replace("USER:Recoverable: error=", "")


def _short(message: str, limit: int = 160) -> str:
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _last_lines(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def literals(values: dict, interface: dict) -> literals_pb2.LiteralMap:
    """Python values as a workflow's input literals (what `pyflyte run` sends)."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine

    ctx = FlyteContextManager.current_context()
    mapped = TypeEngine.dict_to_literal_map(ctx, values, {k: interface[k] for k in values})
    return mapped.to_flyte_idl()


def launch_inputs(plan: launch_plan_pb2.LaunchPlan, overrides: literals_pb2.LiteralMap):
    """A launch plan's default and fixed inputs, overridden by `overrides`."""
    values = {
        k: p.default
        for k, p in plan.spec.default_inputs.parameters.items()
        if p.HasField("default")
    }
    values.update(plan.spec.fixed_inputs.literals)
    values.update(overrides.literals)
    return literals_pb2.LiteralMap(literals=values)
