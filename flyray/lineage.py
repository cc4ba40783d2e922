"""What produced a registered version: the execution, the code, the image and its resolved
dependencies, and the data (docs/platform.md#lineage). Every workload's registration records one
`Lineage` through flyray.registry.register: as tags on the MLflow run and on the model version
(`lineage.*`), and each input as an MLflow dataset input with its content digest, so the registry
answers "which commit, which image, which files" for any version.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DIRTY = "+dirty"
RECIPE_ARTIFACT = "lineage/recipe.json"  # the run's artifact holding the workflow's inputs


_SHA256 = " sha256:"


@dataclass(frozen=True)
class DataInput:
    """One input of a training run: what it is, where it was read, its content digest (the
    fingerprint the data task took: flyray.storage.fingerprint), the data window, if any."""

    name: str
    source: str
    digest: str
    window: str = ""
    rows: int | None = None

    @property
    def tag(self) -> str:
        """The `lineage.data.<name>` tag's value: `<source> sha256:<digest>`."""
        return f"{self.source}{_SHA256}{self.digest}"

    @staticmethod
    def read_tag(text: str) -> tuple[str, str]:
        """(source, digest) of a `lineage.data.*` tag's value."""
        source, _, digest = text.rpartition(_SHA256)
        return source, digest


@dataclass(frozen=True)
class Lineage:
    execution: str  # the Flyte execution (project/domain/name), or the local run's id
    code: str  # commit, with DIRTY when the tree had uncommitted changes
    image: str  # the task's container image (its content-derived tag)
    requirements: str  # sha256 of the image's locked requirements (images/requirements/*.txt)
    inputs: tuple[DataInput, ...] = field(default_factory=tuple)
    # the workflow and its inputs as JSON ({"workflow": ..., "inputs": {...}}; tasks/recipe.py)
    recipe: str = ""

    @property
    def commit(self) -> str:
        return self.code.removesuffix(DIRTY)

    @property
    def dirty(self) -> bool:
        return self.code.endswith(DIRTY)

    def tags(self) -> dict[str, str]:
        """Flat tags, the same on the run and on the version (no secret: names and digests)."""
        tags = {
            "lineage.execution": self.execution,
            "lineage.commit": self.commit,
            "lineage.dirty": str(self.dirty).lower(),
            "lineage.image": self.image,
            "lineage.requirements_sha256": self.requirements,
        }
        if self.recipe:
            tags["lineage.workflow"] = json.loads(self.recipe)["workflow"]
            tags["lineage.recipe"] = RECIPE_ARTIFACT
        for data in self.inputs:
            tags[f"lineage.data.{data.name}"] = data.tag
            if data.window:
                tags[f"lineage.window.{data.name}"] = data.window
        return tags

    def log(self) -> None:
        """Into the active MLflow run: the tags, and each input as a dataset input (MLflow's
        own lineage record: name, digest, source, shown on the run and the logged model)."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        mlflow.set_tags(self.tags())
        if self.recipe:
            mlflow.log_text(self.recipe, RECIPE_ARTIFACT)
        for data in self.inputs:
            # MLflow keeps 36 characters of a digest; the tags hold the whole sha256
            dataset = MetaDataset(
                resolve_dataset_source(data.source or "demo"),
                name=data.name,
                digest=data.digest[:32],
            )
            context = {"mlflow.data.context": "training"}
            if data.window:
                context["window"] = data.window
            mlflow.log_input(dataset, tags=context)


def code_version(root: Path) -> str:
    """The commit checked out at `root`, DIRTY-suffixed when tracked files differ from it; ""
    outside a git checkout (an installed package, an image without .git)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
        if done.returncode:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + (DIRTY if changed else "")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes ("" when it is missing)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


class NotReproducible(Exception):
    """A version that cannot be trained again as it was: the message names what is missing or
    differs (the recipe, the commit, a data file) and what to do."""


@dataclass(frozen=True)
class Recorded:
    """A registered version as its lineage records it (`make reproduce` reads this)."""

    model: str
    version: str
    run_id: str
    tags: dict[str, str]  # the version's lineage.* tags
    recipe: dict  # {"workflow": module.name, "inputs": {...}}
    metrics: dict[str, float]

    def data(self) -> list[tuple[str, str, str]]:
        """(name, source, sha256) of each data input."""
        rows = []
        for tag, text in sorted(self.tags.items()):
            if tag.startswith("lineage.data."):
                rows.append((tag.removeprefix("lineage.data."), *DataInput.read_tag(text)))
        return rows


def read_recorded(client, model: str, version: str) -> Recorded:
    """Version `version` of `model` with its run's recipe and metrics; NotReproducible when the
    version or its recipe is missing."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version(model, version)
    except MlflowException as err:
        raise NotReproducible(f"{model} version {version}: not in the registry ({err})") from None
    tags = {k: v for k, v in found.tags.items() if k.startswith("lineage.")}
    try:
        text = client.download_artifacts(found.run_id, RECIPE_ARTIFACT)
        recipe = json.loads(Path(text).read_text())
    except (MlflowException, OSError) as err:
        raise NotReproducible(
            f"{model} version {version} records no recipe ({RECIPE_ARTIFACT} on run "
            f"{found.run_id}): it was registered before flyray recorded workflow inputs "
            f"({type(err).__name__}); run its workflow again by hand"
        ) from None
    run = client.get_run(found.run_id)
    return Recorded(model, str(version), found.run_id, tags, recipe, dict(run.data.metrics))


def check_code(recorded: Recorded, here: str) -> None:
    """The recorded commit must be the one checked out here, both without uncommitted changes:
    the commit pins the code and, through uv.lock, every resolved dependency."""
    commit, dirty = recorded.tags.get("lineage.commit", ""), recorded.tags.get("lineage.dirty")
    what = f"{recorded.model} version {recorded.version}"
    if not commit:
        raise NotReproducible(f"{what} records no commit (registered outside a git checkout)")
    if dirty == "true":
        raise NotReproducible(
            f"{what} was trained from uncommitted changes on top of {commit} "
            "(lineage.dirty=true): that code cannot be checked out again"
        )
    if not here:
        raise NotReproducible("this is not a git checkout: clone flyray to reproduce a version")
    if here.endswith(DIRTY):
        raise NotReproducible(
            f"this checkout has uncommitted changes ({here}): commit or stash them first"
        )
    if here != commit:
        raise NotReproducible(
            f"{what} was trained from commit {commit}; this checkout is {here}. Check it out "
            f"(git switch --detach {commit}, or git worktree add ../reproduce {commit}) and run "
            "make reproduce there"
        )


# Metrics that time the run rather than judge the model are not compared.
_TIMINGS = ("seconds", "per_second", "throughput", "_time", "speedup", "efficiency")


def compare_metrics(
    recorded: dict[str, float], reproduced: dict[str, float], rtol: float, atol: float
) -> list[tuple[str, float, float | None, bool]]:
    """(metric, recorded, reproduced, within |b - a| <= atol + rtol * |a|) for every recorded
    quality metric; a metric the re-run lacks is not within."""
    rows = []
    for key in sorted(recorded):
        if any(t in key for t in _TIMINGS):
            continue
        a, b = recorded[key], reproduced.get(key)
        rows.append((key, a, b, b is not None and abs(b - a) <= atol + rtol * abs(a)))
    return rows


def check_data(recorded: Recorded, suffixes: dict[str, tuple[str, ...]]) -> list[str]:
    """Each data input listed in `suffixes` (its name -> the file types its source is read as)
    is fingerprinted again where it was read; NotReproducible names the source when it is gone
    or its content changed. Demo data (an empty `source` in the recipe) is generated again from
    its recorded seed, so it is compared after the run instead. Returns what was checked."""
    from flyray import storage

    demo = not recorded.recipe["inputs"].get("source")
    checked = []
    for name, source, digest in recorded.data():
        if name not in suffixes:
            checked.append(f"{name}: compared after the run (digest {digest[:12]})")
            continue
        try:
            now = storage.fingerprint(storage.list_input_files(source, suffixes[name]))
        except FileNotFoundError as err:
            if demo:
                checked.append(f"{name}: demo data, generated again from the recipe's seed")
                continue
            raise NotReproducible(f"data input {name}: {err} (recorded sha256 {digest})") from None
        if now != digest:
            raise NotReproducible(
                f"data input {name}: {source} changed since version {recorded.version} was "
                f"trained (sha256 {now} now, {digest} recorded)"
            )
        checked.append(f"{name}: {source} unchanged (sha256 {digest[:12]})")
    return checked
