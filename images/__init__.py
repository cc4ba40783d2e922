"""Container images of the workloads, one ImageSpec per family.

Package lists come from pyproject.toml (the base dependencies plus a workload's extra), so the
image and `pip install .[extra]` never drift apart. Registry from FLYRAY_REGISTRY (default
localhost:30000, the Flyte sandbox's); the tag is derived from the spec's content by flytekit,
so a changed dependency gives a new tag. wget is there for KubeRay's head/worker probes.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from flytekit import ImageSpec

_PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
_DEPS = _PROJECT["project"]["dependencies"]
_EXTRAS = _PROJECT["project"]["optional-dependencies"]


def _spec(name: str, *extras: str) -> ImageSpec:
    packages = list(_DEPS) + [p for extra in extras for p in _EXTRAS[extra]]
    return ImageSpec(
        name=f"flyray-{name}",
        python_version="3.11",
        packages=packages,
        apt_packages=["wget"],
        registry=os.environ.get("FLYRAY_REGISTRY", "localhost:30000"),
        env={"PYTHONUNBUFFERED": "1"},
    )


base = _spec("base")
recommender = _spec("recommender", "recommender")
tabular = _spec("tabular", "tabular")
image = _spec("tensorflow", "image")
clip = _spec("torch", "clip")
