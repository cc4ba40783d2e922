"""From validated events to implicit ratings, dense id maps and a leakage-free time split.

Ingest hash-partitions events by user, so each bucket holds complete user histories and every
per-user step (dedup, aggregation, the time split) runs inside one Ray task with numpy, with
no shuffle. Only two small things cross buckets: item popularity for the item filter, and the
id maps. The flow is three rounds of one task per bucket:

  A  sort and deduplicate the bucket's events; count distinct users per item
  B  apply the filters, cut each user's split, aggregate ratings per (user, item, split)
  C  give users and items dense ids and write the splits

Split rule (no leakage): per user, items are ordered by their first interaction; the latest
test_fraction of them is test, the validation_fraction before that is validation. Ties at a
cut go to the later split. A training pair's events at or after the user's first held-out
interaction are dropped (counted as truncated), so every held-out interaction is strictly
later than every training interaction of that user; validation is cut from test the same way.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from flyray import storage
from flyray.arrays import segment_ranges
from flyray.clickstream.config import FeatureConfig
from flyray.clickstream.reports import DataProfile, IngestReport
from flyray.raytrain import require_ray

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
_NEVER = np.iinfo(np.int64).max

RATINGS_SCHEMA = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("item_idx", pa.int32()),
        ("rating", pa.float32()),
        ("weight", pa.float32()),
        ("n_events", pa.int32()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("first_ts", pa.timestamp("us", tz="UTC")),
        ("last_ts", pa.timestamp("us", tz="UTC")),
    ]
)


class FeatureError(ValueError):
    """Prepared data that cannot feed training: the message says which count fell short."""


@dataclass
class _Sorted:
    """One bucket's deduplicated events sorted by (user, item, time)."""

    user: np.ndarray
    item: np.ndarray
    code: np.ndarray
    ts: np.ndarray
    pair_start: np.ndarray  # index of each (user, item) pair's first event


def _read_bucket(fs: pafs.FileSystem, path: str, window: tuple | None) -> pa.Table:
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return pa.table({"user_id": pa.array([], pa.int64())})
    filters = [("ts", ">=", window[0]), ("ts", "<", window[1])] if window else None
    columns = ["user_id", "item_id", "event_code", "ts"]
    return storage.read_table(storage.to_uri(fs, path), columns, filters, fs=fs)


def sort_events(table: pa.Table) -> tuple[dict, _Sorted]:
    """Round A: sort by (user, item, time), drop exact duplicates, count users per item."""
    if table.num_rows == 0:
        empty = np.zeros(0, np.int64)
        return {"events": 0, "dups": 0, "items": empty, "users_per_item": empty, "users": 0}, (
            _Sorted(empty, empty, np.zeros(0, np.int8), empty, empty)
        )
    u = table["user_id"].to_numpy()
    i = table["item_id"].to_numpy()
    c = table["event_code"].to_numpy()
    t = table["ts"].cast(pa.int64()).to_numpy()
    order = np.lexsort((t * 4 + c, i, u))  # 4 event codes: time and code as one key
    u, i, c, t = u[order], i[order], c[order], t[order]
    same = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1]) & (c[1:] == c[:-1])
    keep = np.concatenate(([True], ~same))
    u, i, c, t = u[keep], i[keep], c[keep], t[keep]
    new_pair = np.concatenate(([True], (u[1:] != u[:-1]) | (i[1:] != i[:-1])))
    pair_start = np.flatnonzero(new_pair)
    items, users_per_item = np.unique(i[pair_start], return_counts=True)
    stats = {
        "events": len(order),
        "dups": int(len(order) - len(u)),
        "items": items,
        "users_per_item": users_per_item,
        "users": int(np.count_nonzero(np.diff(u)) + 1),
    }
    return stats, _Sorted(u, i, c, t, pair_start)


def _segment_starts(keys: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1]))) if len(keys) else keys


def rate_pairs(data: _Sorted, kept_items: np.ndarray, cfg: FeatureConfig) -> tuple[dict, pa.Table]:
    """Round B: filters, the per-user split, and one weighted rating per (user, item, split)."""
    u, i, c, t, ps = data.user, data.item, data.code, data.ts, data.pair_start
    n_events = len(u)
    pair_len = np.diff(np.append(ps, n_events))
    pu, pi, pfirst = u[ps], i[ps], t[ps]
    ok = np.isin(pi, kept_items, assume_unique=False, kind="sort")
    # Users need min_user_interactions distinct kept items (pairs are sorted by user).
    starts = _segment_starts(pu)
    kept_per_user = np.add.reduceat(ok.astype(np.int64), starts) if len(pu) else pu
    user_ok = np.repeat(
        kept_per_user >= cfg.min_user_interactions, np.diff(np.append(starts, len(pu)))
    )
    sel = np.flatnonzero(ok & user_ok)
    # Order each user's kept pairs by first interaction and cut the split.
    sel = sel[np.lexsort((pfirst[sel], pu[sel]))]  # stable: ties stay in item order
    su, sfirst = pu[sel], pfirst[sel]
    ustart = _segment_starts(su)
    counts = np.diff(np.append(ustart, len(su)))
    n_test = _holdout(counts, cfg.test_fraction)
    n_val = np.minimum(
        _holdout(counts, cfg.validation_fraction), np.maximum(counts - 1 - n_test, 0)
    )
    n_test = np.minimum(n_test, counts - 1)
    c_test = np.where(n_test > 0, sfirst[np.minimum(ustart + counts - n_test, len(su) - 1)], _NEVER)
    c_val = np.where(
        n_val > 0, sfirst[np.minimum(ustart + counts - n_test - n_val, len(su) - 1)], c_test
    )
    no_train = sfirst[ustart] >= c_val  # ties at the cut leave nothing strictly earlier
    c_val = np.where(no_train, _NEVER, c_val)
    c_test = np.where(no_train, _NEVER, c_test)
    per_pair_cval = np.repeat(c_val, counts)
    per_pair_ctest = np.repeat(c_test, counts)
    split = np.where(sfirst >= per_pair_ctest, 2, np.where(sfirst >= per_pair_cval, 1, 0))
    limit = np.where(split == 0, per_pair_cval, np.where(split == 1, per_pair_ctest, _NEVER))
    # Events of the selected pairs, each checked against its pair's limit.
    lens = pair_len[sel]
    ev = np.repeat(ps[sel], lens) + segment_ranges(lens)
    pair_of_ev = np.repeat(np.arange(len(sel)), lens)
    ev_ok = t[ev] < limit[pair_of_ev]
    weights = cfg.weight_vector()[c[ev]] * ev_ok
    w = np.bincount(pair_of_ev, weights=weights, minlength=len(sel))
    n = np.bincount(pair_of_ev, weights=ev_ok, minlength=len(sel)).astype(np.int32)
    last = t[ps[sel] + np.maximum(n, 1) - 1]  # kept events are a time-ordered prefix
    positive = w > 0
    rating = cfg.rating_min + (cfg.rating_max - cfg.rating_min) * (1 - np.exp(-w / cfg.saturation))
    table = _pairs_table(
        su[positive],
        pi[sel][positive],
        split[positive].astype(np.int8),
        rating[positive].astype(np.float32),
        w[positive].astype(np.float32),
        n[positive],
        sfirst[positive],
        last[positive],
    )
    stats = _bucket_stats(
        int(len(ev) - ev_ok.sum()),
        int((~positive).sum()),
        int(no_train.sum()),
        np.unique(su[positive]),
        np.unique(pi[sel][positive]),
        t,
        float(rating[positive].sum()),
    )
    return stats, table


def _pairs_table(user, item, split, rating, weight, n_events, first_ts, last_ts) -> pa.Table:
    return pa.table(
        {
            "user_id": user,
            "item_id": item,
            "split": split,
            "rating": rating,
            "weight": weight,
            "n_events": n_events,
            "first_ts": first_ts,
            "last_ts": last_ts,
        }
    )


def _bucket_stats(truncated, non_positive, no_holdout, users, items, ts, rating_sum) -> dict:
    return {
        "truncated": truncated,
        "non_positive": non_positive,
        "no_holdout": no_holdout,
        "users": users,
        "items": items,
        "first_ts": int(ts.min()) if len(ts) else _NEVER,
        "last_ts": int(ts.max()) if len(ts) else 0,
        "rating_sum": rating_sum,
    }


def _holdout(counts: np.ndarray, fraction: float) -> np.ndarray:
    if fraction <= 0:
        return np.zeros_like(counts)
    return np.maximum(1, np.round(counts * fraction)).astype(np.int64)


def write_splits(
    table: pa.Table,
    users: np.ndarray,
    user_offset: int,
    items: np.ndarray,
    fs: pafs.FileSystem,
    out_path: str,
    bucket: int,
) -> list[int]:
    """Round C: dense ids from the global maps, then one parquet part per split."""
    user_idx = user_offset + np.searchsorted(users, table["user_id"].to_numpy())
    item_idx = np.searchsorted(items, table["item_id"].to_numpy())
    full = pa.table(
        {
            "user_idx": user_idx.astype(np.int32),
            "item_idx": item_idx.astype(np.int32),
            "rating": table["rating"],
            "weight": table["weight"],
            "n_events": table["n_events"],
            "user_id": table["user_id"],
            "item_id": table["item_id"],
            "first_ts": pa.array(table["first_ts"].to_numpy(), pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
            "last_ts": pa.array(table["last_ts"].to_numpy(), pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
        },
        schema=RATINGS_SCHEMA,
    )
    split = table["split"].to_numpy()
    sizes = []
    for code, name in enumerate(SPLITS):
        part = full.filter(pa.array(split == code))
        # Dictionary-encoding float and id columns costs a third of the write and saves little.
        path = f"{out_path}/{name}/part-{bucket:05d}.parquet"
        storage.write_table(fs, path, part, use_dictionary=False)
        sizes.append(part.num_rows)
    return sizes


_round_a = ray.remote(num_returns=2)(
    lambda fs, path, window: sort_events(_read_bucket(fs, path, window))
)
_round_b = ray.remote(num_returns=2)(rate_pairs)
_round_c = ray.remote(write_splits)


def build_features(
    events_uri: str,
    output_uri: str,
    config: FeatureConfig | None = None,
    ingest_report: IngestReport | None = None,
) -> DataProfile:
    """Turn bucketed events into ratings splits, id maps and a profile under `output_uri`.

    Writes train/, validation/, test/ (parquet, RATINGS_SCHEMA), id_maps/users.parquet,
    id_maps/items.parquet and profile.json.
    """
    config = config or FeatureConfig()
    began = time.perf_counter()
    fs, events_path = storage.filesystem(events_uri)
    buckets = sorted(
        int(info.base_name.split("=", 1)[1])
        for info in fs.get_file_info(pafs.FileSelector(events_path))
        if info.base_name.startswith("bucket=")
    )
    if not buckets:
        raise FeatureError(f"no events under {events_uri}: run ingest first")
    if not storage.is_complete(events_uri):
        raise FeatureError(
            f"{events_uri} has no valid {storage.SUCCESS} marker: the ingest that wrote it did "
            "not finish (or rejected too much), or its files changed since; run ingest again"
        )
    require_ray()
    out_fs, out_path = prepare_output(output_uri)
    window = config.window()
    a = [_round_a.remote(fs, f"{events_path}/bucket={b}", window) for b in buckets]
    stats_a = ray.get([s for s, _ in a])
    if window and not sum(s["events"] for s in stats_a):
        raise FeatureError(f"no events between {window[0]} and {window[1]} in {events_uri}")
    n_seen, kept_items = select_items(stats_a, config)
    kept_ref = ray.put(kept_items)
    b = [_round_b.remote(sorted_ref, kept_ref, config) for _, sorted_ref in a]
    stats_b = ray.get([s for s, _ in b])
    items = rated_items(stats_b, n_seen, kept_items, config)
    offsets = np.cumsum([0] + [len(s["users"]) for s in stats_b])
    items_ref = ray.put(items)
    sizes = ray.get(
        [
            _round_c.remote(tref, s["users"], int(off), items_ref, out_fs, out_path, bk)
            for (_, tref), s, off, bk in zip(b, stats_b, offsets[:-1], buckets, strict=True)
        ]
    )
    return finalize(
        out_fs, out_path, stats_a, stats_b, sizes, items, n_seen, ingest_report, began,
        _window_text(config),
    )  # fmt: skip


def prepare_output(output_uri: str) -> tuple[pafs.FileSystem, str]:
    """An emptied output directory with one folder per split and for the id maps."""
    out_fs, out_path = storage.filesystem(output_uri)
    out_fs.delete_dir_contents(out_path, missing_dir_ok=True)
    for name in (*SPLITS, "id_maps"):
        out_fs.create_dir(f"{out_path}/{name}", recursive=True)
    return out_fs, out_path


def select_items(stats_a: list[dict], config: FeatureConfig) -> tuple[int, np.ndarray]:
    """(items seen, sorted ids of items with enough distinct users) across all buckets."""
    all_items = np.concatenate([s["items"] for s in stats_a])
    unique_items, inverse = np.unique(all_items, return_inverse=True)
    users = np.bincount(inverse, weights=np.concatenate([s["users_per_item"] for s in stats_a]))
    kept_items = unique_items[users >= config.min_item_interactions]
    log.info("features: %d items seen, %d kept", len(unique_items), len(kept_items))
    return len(unique_items), kept_items


def rated_items(
    stats_b: list[dict], n_seen: int, kept_items: np.ndarray, config: FeatureConfig
) -> np.ndarray:
    """Sorted ids of the items left with ratings: the item id map."""
    if not sum(len(s["users"]) for s in stats_b):
        raise FeatureError(
            f"no ratings left after filtering: {n_seen} items seen, "
            f"{len(kept_items)} with >= {config.min_item_interactions} users; no user has "
            f">= {config.min_user_interactions} of those (lower the minimums or add data)"
        )
    return np.unique(np.concatenate([s["items"] for s in stats_b]))


def finalize(
    out_fs: pafs.FileSystem,
    out_path: str,
    stats_a: list[dict],
    stats_b: list[dict],
    sizes: list[list[int]],
    items: np.ndarray,
    n_seen: int,
    ingest_report: IngestReport | None,
    began: float,
    window: str = "",
) -> DataProfile:
    """Write the id maps and profile.json; return the profile."""
    users = np.concatenate([s["users"] for s in stats_b])
    storage.write_table(
        out_fs,
        f"{out_path}/id_maps/users.parquet",
        pa.table({"user_idx": np.arange(len(users), dtype=np.int32), "user_id": users}),
    )
    storage.write_table(
        out_fs,
        f"{out_path}/id_maps/items.parquet",
        pa.table({"item_idx": np.arange(len(items), dtype=np.int32), "item_id": items}),
    )
    by_split = dict(zip(SPLITS, np.sum(sizes, axis=0).tolist(), strict=True))
    n_ratings = sum(by_split.values())
    first = min(s["first_ts"] for s in stats_b)
    last = max(s["last_ts"] for s in stats_b)
    profile = DataProfile(
        events=sum(s["events"] for s in stats_a),
        events_by_type=dict(ingest_report.events_by_type) if ingest_report else {},
        rejects=ingest_report.rejects if ingest_report else 0,
        rejects_by_reason=dict(ingest_report.rejects_by_reason) if ingest_report else {},
        duplicates_removed=sum(s["dups"] for s in stats_a),
        truncated_events=sum(s["truncated"] for s in stats_b),
        non_positive_pairs=sum(s["non_positive"] for s in stats_b),
        users_seen=sum(s["users"] for s in stats_a),
        items_seen=n_seen,
        users=len(users),
        items=len(items),
        ratings_by_split=by_split,
        users_without_holdout=sum(s["no_holdout"] for s in stats_b),
        sparsity=1.0 - n_ratings / (len(users) * len(items)),
        rating_mean=sum(s["rating_sum"] for s in stats_b) / n_ratings,
        first_event=str(np.datetime64(first, "us")) + "Z",
        last_event=str(np.datetime64(last, "us")) + "Z",
        seconds=time.perf_counter() - began,
        source=ingest_report.source if ingest_report else "",
        fingerprint=ingest_report.fingerprint if ingest_report else "",
        window=window,
    )
    storage.write_atomic(
        out_fs, f"{out_path}/profile.json", json.dumps(asdict(profile), indent=2).encode()
    )
    log.info("features: %s", by_split)
    return profile


def _window_text(config: FeatureConfig) -> str:
    """The data window as [start, end) in ISO form, "" for all events."""
    window = config.window()
    return f"[{window[0].isoformat()}, {window[1].isoformat()})" if window else ""
