"""Each image's pinned requirements, exported from uv.lock: an ImageSpec installs exactly the
locked versions, and its tag (a hash flytekit takes of the file) changes exactly when one of
them does.

    python -m images.requirements [--write]   # check (exit 1 naming the stale file) or rewrite

`make lock` rewrites them; tests/test_lock.py fails when one is stale.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = Path(__file__).resolve().parent / "requirements"
# image family -> the extras it installs beside the base dependencies (a dependency group: only
# that group).
IMAGES = {
    "recommender": ["--extra", "recommender"],
    "tabular": ["--extra", "tabular"],
    "tensorflow": ["--extra", "image"],
    "torch": ["--extra", "clip"],
    "serve": ["--extra", "recommender", "--extra", "tabular", "--extra", "image",
              "--extra", "clip"],
    "mlflow-server": ["--only-group", "mlflow-server"],
}  # fmt: skip


def path(image: str) -> Path:
    return FOLDER / f"{image}.txt"


def export(image: str) -> str:
    """The image's requirements as uv.lock pins them (no network: --frozen reads the lock)."""
    uv = Path(sys.executable).parent / "uv"
    argv = [str(uv), "export", "--frozen", "--no-hashes", "--no-header", "--no-emit-project",
            "--no-annotate", "--no-default-groups", *IMAGES[image]]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout


def main(argv: list[str]) -> int:
    stale = []
    for image in IMAGES:
        text = export(image)
        if "--write" in argv:
            path(image).write_text(text)
        elif not path(image).exists() or path(image).read_text() != text:
            stale.append(str(path(image).relative_to(ROOT)))
    if stale:
        print(f"stale against uv.lock: {stale}; run `make lock`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
