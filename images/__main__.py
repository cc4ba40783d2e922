"""Build and push every ImageSpec (needs a Docker engine and FLYRAY_REGISTRY to push to).

python -m images [NAME ...]     # all by default; prints each image's full name
"""

from __future__ import annotations

import sys

from flytekit import ImageSpec
from flytekit.image_spec.image_spec import ImageBuildEngine

import images


def main(names: list[str]) -> int:
    specs = {n: v for n, v in vars(images).items() if isinstance(v, ImageSpec)}
    unknown = set(names) - set(specs)
    if unknown:
        print(f"unknown image(s) {sorted(unknown)}; known: {sorted(specs)}", file=sys.stderr)
        return 2
    for name in names or specs:
        ImageBuildEngine.build(specs[name])
        print(f"{name}: {specs[name].image_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
