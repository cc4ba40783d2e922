"""The locked supply chain (docs/supply-chain.md): uv.lock agrees with pyproject.toml, every
image installs exactly the lock's pins, and every dependency floor is above the advisories
docs/supply-chain.md names."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from images import requirements
from tests.conftest import REPO

UV = Path(sys.executable).parent / "uv"


def test_the_lock_agrees_with_pyproject():
    """What `make setup` (`uv sync --locked`) would refuse; no network: the lock is checked."""
    done = subprocess.run([str(UV), "lock", "--check", "--offline", "--python", sys.executable],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_every_image_installs_exactly_the_locked_versions():
    assert requirements.main([]) == 0  # each images/requirements/*.txt is the lock's export
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    locked = {p["name"]: p["version"] for p in lock["package"]}
    for image in requirements.IMAGES:
        for line in requirements.path(image).read_text().splitlines():
            name, version = re.match(r"([\w.-]+)(?:\[[\w,-]+\])?==(\S+)", line).groups()
            assert locked[name.lower()] == version, (image, line)


def _floors() -> dict[str, Version]:
    """The lowest version pyproject.toml admits for each direct dependency (any extra)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    specs += [s for extra in project["optional-dependencies"].values() for s in extra]
    floors: dict[str, Version] = {}
    for spec in specs:
        req = Requirement(spec)
        lows = [Version(s.version.split("+")[0]) for s in req.specifier
                if s.operator in (">=", "==", "~=")]  # fmt: skip
        if lows:
            floors[req.name.lower()] = max(lows + [floors.get(req.name.lower(), Version("0"))])
    return floors


def test_every_floor_is_above_the_advisories_the_docs_name():
    table = (REPO / "docs" / "supply-chain.md").read_text()
    rows = re.findall(r"^\| ([\w-]+) \| [^|]+ \| ([\d.]+) \| ([\d.]+) \|$", table, re.M)
    assert {r[0] for r in rows} >= {"mlflow", "transformers", "python-multipart", "pillow"}
    floors = _floors()
    for package, fixed, floor in rows:
        assert floors[package] == Version(floor), (package, floors[package], floor)
        assert floors[package] >= Version(fixed), f"{package}: floor {floor} admits {fixed}'s bug"
