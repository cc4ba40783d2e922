"""What produced a registered version: the execution, the code, the image and its resolved
dependencies, and the data (docs/platform.md#lineage). Every workload's registration records one
`Lineage` through flyray.registry.register: as tags on the MLflow run and on the model version
(`lineage.*`), and each input as an MLflow dataset input with its content digest, so the registry
answers "which commit, which image, which files" for any version.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DIRTY = "+dirty"


@dataclass(frozen=True)
class DataInput:
    """One input of a training run: what it is, where it was read, its content digest (the
    fingerprint the data task took: flyray.storage.fingerprint), the data window, if any."""

    name: str
    source: str
    digest: str
    window: str = ""
    rows: int | None = None


@dataclass(frozen=True)
class Lineage:
    execution: str  # the Flyte execution (project/domain/name), or the local run's id
    code: str  # commit, with DIRTY when the tree had uncommitted changes
    image: str  # the task's container image (its content-derived tag)
    requirements: str  # sha256 of the image's locked requirements (images/requirements/*.txt)
    inputs: tuple[DataInput, ...] = field(default_factory=tuple)

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
        for data in self.inputs:
            tags[f"lineage.data.{data.name}"] = f"{data.source} sha256:{data.digest}"
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
