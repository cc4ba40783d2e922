"""Large synthetic binary-classification tables for benchmarks, written chunk by chunk.

The label is drawn from a logistic model with interactions and thresholds (so trees have work
to do) over standard-normal features; optional string columns shift the logit per category.
Deterministic for a seed; memory stays flat at any size.

    python -m flyray.tabular.generate OUT.parquet --rows 1000000 --features 50 [--categorical 0]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flyray import storage

log = logging.getLogger(__name__)
_CHUNK = 250_000  # rows per row group; bounds memory
_LEVELS = 8  # values per categorical column


def generate_table(
    out: str, rows: int, features: int, categorical: int = 0, seed: int = 0, label="label"
) -> str:
    """Write `rows` x (`features` numeric + `categorical` string columns + label) to `out`."""
    if features < 2:
        raise ValueError("features must be at least 2")
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 1, features) * (rng.random(features) < 0.5)  # half informative
    cat_effects = rng.normal(0, 1, (categorical, _LEVELS))
    names = [f"f{j:03d}" for j in range(features)]
    cat_names = [f"c{j:02d}" for j in range(categorical)]
    levels = np.array([f"level_{k}" for k in range(_LEVELS)])
    writer = None
    # Whole or absent: benchmarks reuse a table that exists, so a cut-short one must not.
    with storage.atomic_output(*storage.filesystem(out)) as sink:
        try:
            for start in range(0, rows, _CHUNK):
                n = min(_CHUNK, rows - start)
                x = rng.standard_normal((n, features), dtype=np.float32)
                logit = x @ weights / np.sqrt(max(1.0, (weights != 0).sum() / 4))
                logit += 1.5 * x[:, 0] * x[:, 1] - 2.0 * (x[:, -1] > 1.0)
                codes = rng.integers(0, _LEVELS, (n, categorical))
                for j in range(categorical):
                    logit += cat_effects[j, codes[:, j]]
                y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
                cols = {name: x[:, j] for j, name in enumerate(names)}
                cols.update({name: levels[codes[:, j]] for j, name in enumerate(cat_names)})
                cols[label] = y
                table = pa.table(cols)
                if writer is None:
                    writer = pq.ParquetWriter(sink, table.schema)
                writer.write_table(table, row_group_size=_CHUNK)
        finally:
            if writer is not None:
                writer.close()
    log.info("generate: %d rows x %d features (+%d categorical) -> %s", rows, features,
             categorical, out)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output parquet file, local or s3://")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--categorical", type=int, default=0, help="extra string columns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="label")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    generate_table(args.out, args.rows, args.features, args.categorical, args.seed, args.label)


if __name__ == "__main__":
    main()
