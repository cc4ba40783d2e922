"""Parquet tables in, validated and encoded train/validation/test splits out.

`prepare(source, out, config)`:
1. lists the parquet files (a file, a directory or a glob, local or s3://) and checks every
   file's schema against the first from the footers alone: schema drift names both files;
2. profiles the rows with Ray Data (one pass): row count, valid values per column, label values,
   categorical vocabularies; empty data, a missing or non-binary label and all-NaN columns are
   errors naming the column;
3. encodes and splits with Ray Data (one more pass, no shuffle): features become float32 (a
   categorical column becomes the index of its value in the recorded vocabulary, NaN if
   unknown), the label 0/1, and every row goes to a split chosen from a seeded hash of its
   content, so the split does not depend on file order or block layout and duplicate rows never
   straddle splits. Splits are written as `<out>/split=<name>/*.parquet`. Rows without a label
   are counted and written, as read, to `<out>/rejects/`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs  # noqa: F401  (pa.fs in annotations)
import pyarrow.parquet as pq

from flyray import storage

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
_FORBIDDEN_IN_NAMES = "[]<"  # XGBoost refuses these in feature names
_MAX_LABEL_VALUES = 10  # distinct label values kept per batch: enough to name them in an error


@dataclass
class TableConfig:
    """What the columns mean and how rows are split."""

    label: str = "label"
    positive_label: str = ""  # the class encoded as 1; "" = 1/True, else the last in sort order
    exclude: list[str] = field(default_factory=list)  # not features (ids, timestamps, ...)
    categorical: list[str] = field(default_factory=list)  # numeric columns to treat as such;
    # string and dictionary columns are always categorical
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    max_categories: int = 1000
    max_reject_fraction: float = 0.01  # rows without a label, beyond which prepare fails


@dataclass
class TableSpec:
    """The recorded encoding and what the data looked like: travels with the model."""

    source: str
    files: int
    label: str
    label_classes: list[str]  # [negative, positive] as text; encoded 0 and 1
    features: list[str]
    categories: dict[str, list[str]]  # categorical feature -> vocabulary; code = index
    rows: int
    rejected_rows: int
    rows_by_split: dict[str, int]
    positive_rate: float
    rejects_uri: str = ""
    fingerprint: str = ""  # the source's content (flyray.storage.fingerprint), for lineage

    def feature_types(self) -> list[str]:
        """XGBoost's feature types: 'c' (categorical codes) or 'q' (numeric)."""
        return ["c" if f in self.categories else "q" for f in self.features]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TableSpec:
        return cls(**json.loads(text))


def split_uri(out: str, name: str) -> str:
    return storage.join(out, f"split={name}")


# ---------------------------------------------------------------------------------- schemas


def read_schemas(files: list[str]) -> list[tuple[pa.Schema, int]]:
    """(arrow schema, row count) of each file from its footer; no data is read."""

    def one(uri: str) -> tuple[pa.Schema, int]:
        fs, path = storage.filesystem(uri)
        try:
            meta = pq.read_metadata(path, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ValueError(f"{uri}: not a readable parquet file ({exc})") from exc
        return meta.schema.to_arrow_schema().remove_metadata(), meta.num_rows

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(files)))) as pool:
        return list(pool.map(one, files))


def check_schemas(files: list[str], schemas: list[pa.Schema]) -> pa.Schema:
    """The common schema; a file whose columns or types differ from the first file's is an error
    naming both files and the columns."""
    first = schemas[0]
    ref = {f.name: f.type for f in first}
    for uri, schema in zip(files[1:], schemas[1:], strict=True):
        cols = {f.name: f.type for f in schema}
        missing = [c for c in ref if c not in cols]
        extra = [c for c in cols if c not in ref]
        changed = [f"{c} ({ref[c]} -> {cols[c]})" for c in ref if c in cols and cols[c] != ref[c]]
        if missing or extra or changed:
            parts = [
                f"missing columns {missing}" if missing else "",
                f"extra columns {extra}" if extra else "",
                f"changed types {changed}" if changed else "",
            ]
            raise ValueError(
                f"schema drift: {uri} differs from {files[0]}: " + "; ".join(p for p in parts if p)
            )
    return first


def feature_columns(schema: pa.Schema, config: TableConfig) -> tuple[list[str], list[str]]:
    """(features, categorical features) of a schema; unusable columns are errors naming them."""
    names = schema.names
    if config.label not in names:
        raise ValueError(f"label column {config.label!r} not found; columns are {names}")
    unknown = [c for c in config.exclude + config.categorical if c not in names]
    if unknown:
        raise ValueError(f"columns {unknown} named in the config are not in the data ({names})")
    features, categorical = [], []
    for f in schema:
        if f.name == config.label or f.name in config.exclude:
            continue
        if any(ch in f.name for ch in _FORBIDDEN_IN_NAMES):
            raise ValueError(f"column {f.name!r}: XGBoost feature names may not contain [, ] or <")
        t = f.type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or f.name in config.categorical:
            categorical.append(f.name)
        elif not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise ValueError(
                f"column {f.name!r} has type {f.type}: features must be numeric, boolean or "
                f"string; list it in exclude to leave it out"
            )
        features.append(f.name)
    if not features:
        raise ValueError(f"no feature columns besides the label {config.label!r}")
    return features, categorical


# ---------------------------------------------------------------------------------- profile


def _valid_count(col: pa.ChunkedArray) -> int:
    """Values that are neither null nor NaN."""
    n = len(col) - col.null_count
    if pa.types.is_floating(col.type):
        n -= pc.sum(pc.is_nan(col)).as_py() or 0
    return n


def _as_text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col if pa.types.is_string(col.type) else pc.cast(col, pa.string())


def profile_batch(
    batch: pa.Table, label: str, features: list[str], categorical: list[str], max_categories: int
) -> pa.Table:
    """One row of counts for a batch, as JSON (merged on the driver by `merge_profiles`)."""
    labels = batch[label]
    counts = pc.value_counts(labels.drop_null()) if len(labels) else []
    profile = {
        "rows": batch.num_rows,
        "null_labels": labels.null_count,
        "labels": [[v["values"].as_py(), v["counts"].as_py()] for v in counts][:_MAX_LABEL_VALUES],
        "valid": {c: _valid_count(batch[c]) for c in features},
        "vocab": {
            c: pc.unique(_as_text(batch[c]).drop_null()).to_pylist()[: max_categories + 1]
            for c in categorical
        },
    }
    return pa.table({"profile": [json.dumps(profile)]})


def merge_profiles(profiles: list[dict]) -> dict:
    labels: Counter = Counter()
    valid: Counter = Counter()
    vocab: dict[str, set] = {}
    for p in profiles:
        labels.update({json.dumps(v): n for v, n in p["labels"]})
        valid.update(p["valid"])
        for c, values in p["vocab"].items():
            vocab.setdefault(c, set()).update(values)
    return {
        "rows": sum(p["rows"] for p in profiles),
        "null_labels": sum(p["null_labels"] for p in profiles),
        "labels": {json.loads(k): n for k, n in labels.items()},
        "valid": valid,
        "vocab": vocab,
    }


def label_classes(values: list, config: TableConfig) -> tuple[object, object]:
    """(negative, positive) label values; anything but exactly two classes is an error."""
    if len(values) != 2:
        shown = sorted(map(str, values))[:_MAX_LABEL_VALUES]
        raise ValueError(
            f"label column {config.label!r} must have exactly 2 distinct values for binary "
            f"classification; found {len(values)}: {shown}"
        )
    ordered = sorted(values, key=lambda v: (str(type(v)), v))
    if config.positive_label:
        match = [v for v in ordered if str(v) == config.positive_label]
        if not match:
            raise ValueError(
                f"positive_label {config.positive_label!r} is not a value of label column "
                f"{config.label!r} ({[str(v) for v in ordered]})"
            )
        positive = match[0]
    else:
        positive = ordered[-1]  # 1 over 0, True over False
    return next(v for v in ordered if v != positive), positive


# ---------------------------------------------------------------------------------- encoding


def encode_features(table: pa.Table, spec: TableSpec) -> pa.Table:
    """The model's input: every feature as float32, categoricals as vocabulary codes (NaN when
    null or unknown). The one place the recorded encoding is applied, for training and serving.
    """
    missing = [c for c in spec.features if c not in table.column_names]
    if missing:
        raise ValueError(f"input lacks feature columns {missing}")
    cols = []
    for name in spec.features:
        col = table[name]
        if name in spec.categories:
            col = pc.index_in(_as_text(col), value_set=pa.array(spec.categories[name]))
        col = pc.cast(col, pa.float32())
        cols.append(pc.fill_null(col, np.float32("nan")))
    return pa.table(cols, names=spec.features)


def split_of(features: pa.Table, labels: np.ndarray, config: TableConfig) -> np.ndarray:
    """Split name per row from a seeded hash of its encoded content (see the module docstring)."""
    frame = features.to_pandas()
    frame["__label"] = labels
    hashed = pd.util.hash_pandas_object(frame, index=False, hash_key=f"{config.seed:016d}")
    u = (hashed.to_numpy() % np.uint64(1_000_000)) / 1_000_000
    out = np.full(len(u), "train", dtype=object)
    out[u < config.test_fraction + config.validation_fraction] = "validation"
    out[u < config.test_fraction] = "test"
    return out


def encode_batch(batch: pa.Table, spec: TableSpec, positive: object, config: TableConfig):
    """Encoded features, the 0/1 label and the split of the labelled rows of a batch."""
    batch = batch.filter(pc.is_valid(batch[spec.label]))
    col = batch[spec.label]
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    labels = pc.equal(col, pa.scalar(positive, col.type))
    y = labels.to_numpy(zero_copy_only=False).astype(np.int8)
    encoded = encode_features(batch, spec)
    return encoded.append_column(spec.label, pa.array(y)).append_column(
        "split", pa.array(split_of(encoded, y, config), pa.string())
    )


def read_split(uri: str, spec: TableSpec) -> tuple[np.ndarray, np.ndarray]:
    """(X float32 [rows, features], y int8) of a written split, read in place with pyarrow."""
    return table_to_xy(storage.read_table(uri, [*spec.features, spec.label]), spec)


def split_files(uri: str) -> tuple[pa.fs.FileSystem, list[str]]:
    """(filesystem, paths) of a written split: what a Ray worker needs to read it, resolved on
    the driver (whose environment holds the storage settings)."""
    files = storage.list_input_files(uri, PARQUET_SUFFIXES)
    return storage.filesystem(uri)[0], [storage.filesystem(f.path)[1] for f in files]


def read_share(
    fs: pa.fs.FileSystem, paths: list[str], spec: TableSpec, rank: int, world: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows [rank*N/world, (rank+1)*N/world) of a split's files, reading only the row groups
    that hold them: each Ray Train worker reads its share in place, with no driver or actor
    between storage and the worker (pyarrow has no row-range read across files)."""
    files = [pq.ParquetFile(p, filesystem=fs) for p in paths]
    total = sum(f.metadata.num_rows for f in files)
    lo, hi = rank * total // world, (rank + 1) * total // world
    pieces, offset = [], 0
    for pf in files:
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < hi and offset + n > lo:
                part = pf.read_row_group(g, columns=[*spec.features, spec.label])
                start, stop = max(0, lo - offset), min(n, hi - offset)
                pieces.append(part.slice(start, stop - start))
            offset += n
    return table_to_xy(pa.concat_tables(pieces), spec)


def table_to_xy(table: pa.Table, spec: TableSpec) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((table.num_rows, len(spec.features)), dtype=np.float32, order="F")
    for j, name in enumerate(spec.features):
        x[:, j] = table[name].to_numpy()
    return x, table[spec.label].to_numpy().astype(np.int8)


# ---------------------------------------------------------------------------------- prepare


def prepare(source: str, out: str, config: TableConfig | None = None) -> TableSpec:
    """Validate, encode and split `source` into `out` (see the module docstring)."""
    import ray.data

    config = config or TableConfig()
    if not 0 < config.validation_fraction + config.test_fraction < 1:
        raise ValueError("validation_fraction + test_fraction must be between 0 and 1")
    files = [f.path for f in storage.list_input_files(source, PARQUET_SUFFIXES)]
    schemas, rows = zip(*read_schemas(files), strict=True)
    schema = check_schemas(files, list(schemas))
    features, categorical = feature_columns(schema, config)
    if sum(rows) == 0:
        raise ValueError(f"empty dataset: {source} has no rows ({len(files)} parquet files)")
    fs, _ = storage.filesystem(files[0])
    paths = [storage.filesystem(f)[1] for f in files]
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns([*features, config.label])

    args = dict(label=config.label, features=features, categorical=categorical,
                max_categories=config.max_categories)  # fmt: skip
    profiled = ds.map_batches(profile_batch, batch_format="pyarrow", batch_size=None,
                              fn_kwargs=args).take_all()  # fmt: skip
    prof = merge_profiles([json.loads(r["profile"]) for r in profiled])
    labelled = prof["rows"] - prof["null_labels"]
    if labelled == 0:
        raise ValueError(f"empty dataset: {source} has no rows with a value in {config.label!r}")
    negative, positive = label_classes(list(prof["labels"]), config)
    all_nan = [c for c in features if prof["valid"][c] == 0]
    if all_nan:
        raise ValueError(
            f"columns {all_nan} have no values (all null or NaN) in {source}; "
            "list them in exclude to train without them"
        )
    too_many = {c: len(v) for c, v in prof["vocab"].items() if len(v) > config.max_categories}
    if too_many:
        raise ValueError(
            f"categorical columns with more than max_categories={config.max_categories} "
            f"values: {sorted(too_many)}"
        )
    spec = TableSpec(
        source=source,
        files=len(files),
        label=config.label,
        label_classes=[str(negative), str(positive)],
        features=features,
        categories={c: sorted(prof["vocab"][c]) for c in categorical},
        rows=prof["rows"],
        rejected_rows=prof["null_labels"],
        rows_by_split={},
        positive_rate=prof["labels"][positive] / labelled,
    )
    out_fs, out_path = storage.filesystem(out)
    if spec.rejected_rows:
        spec.rejects_uri = storage.join(out, "rejects")
        label = config.label
        ds.map_batches(lambda b: b.filter(pc.is_null(b[label])), batch_format="pyarrow",
                       batch_size=None).write_parquet(
            storage.filesystem(spec.rejects_uri)[1], filesystem=out_fs)  # fmt: skip
        fraction = spec.rejected_rows / spec.rows
        if fraction > config.max_reject_fraction:
            raise ValueError(
                f"{spec.rejected_rows} of {spec.rows} rows ({fraction:.2%}) have no value in "
                f"label column {config.label!r}, more than max_reject_fraction "
                f"{config.max_reject_fraction:.2%}; they are in {spec.rejects_uri}"
            )
        log.warning("tabular: %d rows without a label written to %s", spec.rejected_rows,
                    spec.rejects_uri)  # fmt: skip
    ds.map_batches(
        encode_batch, batch_format="pyarrow", batch_size=None,
        fn_kwargs=dict(spec=spec, positive=positive, config=config),
    ).write_parquet(out_path, filesystem=out_fs, partition_cols=["split"])  # fmt: skip
    for name in SPLITS:
        uri = split_uri(out, name)
        try:
            written = storage.list_input_files(uri, PARQUET_SUFFIXES)
        except FileNotFoundError:
            written = []
        spec.rows_by_split[name] = sum(n for _, n in read_schemas([f.path for f in written]))
    empty = [n for n in SPLITS if spec.rows_by_split[n] == 0]
    if empty:
        raise ValueError(
            f"splits {empty} are empty ({labelled} labelled rows): use more data or larger "
            "validation_fraction/test_fraction"
        )
    storage.write_atomic(out_fs, f"{out_path}/spec.json", spec.to_json().encode())
    log.info("tabular: %s rows %d (%s), %d features (%d categorical), positive rate %.3f",
             source, spec.rows, spec.rows_by_split, len(features), len(categorical),
             spec.positive_rate)  # fmt: skip
    return spec


# ---------------------------------------------------------------------------------- demo data


def write_breast_cancer(out: str, label: str = "label") -> str:
    """scikit-learn's bundled Wisconsin breast-cancer table (569 rows, 30 numeric features) as
    parquet; label 1 = benign, as sklearn codes it. Returns the file's URI."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame.rename(columns={"target": label})
    uri = storage.join(out, "breast_cancer.parquet")
    storage.write_table(*storage.filesystem(uri), pa.Table.from_pandas(frame, preserve_index=False))
    return uri
