"""Deterministic demo clickstream with ground truth, streamed to disk in chunks.

Users and items have latent tastes; item popularity follows a power law; each session is a
run of views whose items are drawn by popularity and chosen by taste, and each view may go on
to cart -> purchase (or cart -> remove_from_cart) at rates near those of public e-commerce
logs (REES46: ~6% of views carted, ~1.5-2% purchased). Memory stays flat at any size because
events are produced and written chunk by chunk, in time order. It writes any preset layout
(layouts.PRESETS); a layout without some event type (RetailRocket and Taobao have no removal,
DIGINETICA and YooChoose only views) gets only the events it can say, still n_events of them.

    python -m flyray.clickstream.generate OUT --events 1000000 [--layout taobao] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from flyray import storage
from flyray.clickstream.schema import EVENT_TYPES

log = logging.getLogger(__name__)
_CHUNK = 250_000  # events produced per step; bounds memory
_CANDIDATES = 8  # popular items considered per view; the user's taste picks one
_BRANDS = np.array(["", "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne"])
_CATEGORIES = np.array(
    [
        "",
        "electronics.smartphone",
        "appliances.kitchen",
        "computers.notebook",
        "apparel.shoes",
        "furniture.living_room",
        "electronics.audio",
        "sport.bicycle",
        "kids.toys",
    ]
)


@dataclass
class GeneratorConfig:
    n_events: int = 100_000
    seed: int = 0
    n_users: int | None = None  # default: n_events // 40
    n_items: int | None = None  # default: n_events // 100
    n_factors: int = 8
    days: int = 30
    start: str = "2024-01-01T00:00:00"
    # A preset of layouts.PRESETS; "": from the file name (.csv: rees46, otherwise jsonl).
    layout: str = ""
    popularity_exponent: float = 1.05
    mean_views_per_session: float = 4.0
    cart_rate: float = 0.06  # of views, on average over tastes
    purchase_rate: float = 0.35  # of carts
    remove_rate: float = 0.25  # of carts not purchased

    def sizes(self) -> tuple[int, int]:
        return (
            self.n_users or max(20, self.n_events // 40),
            self.n_items or max(10, self.n_events // 100),
        )


class _World:
    """The latent ground truth: tastes, popularity, activity."""

    def __init__(self, cfg: GeneratorConfig, rng: np.random.Generator):
        n_users, n_items = cfg.sizes()
        self.user_factors = rng.normal(0, 1, (n_users, cfg.n_factors)) / np.sqrt(cfg.n_factors)
        self.item_factors = rng.normal(0, 1, (n_items, cfg.n_factors))
        rank = rng.permutation(n_items) + 1
        popularity = rank**-cfg.popularity_exponent
        self.item_popularity = popularity / popularity.sum()
        activity = rng.lognormal(0, 1, n_users)
        self.user_activity = activity / activity.sum()
        self._pop_cdf = np.cumsum(self.item_popularity)
        self._act_cdf = np.cumsum(self.user_activity)
        self.item_category = np.argmax(self.item_factors[:, : len(_CATEGORIES) - 1], axis=1) + 1
        self.item_brand = rng.integers(0, len(_BRANDS), n_items)
        self.item_price = np.round(rng.lognormal(3.5, 1.0, n_items), 2)

    def users(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self._act_cdf, rng.random(n)), len(self._act_cdf) - 1)

    def items(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return np.minimum(np.searchsorted(self._pop_cdf, rng.random(shape)), len(self._pop_cdf) - 1)


def _chunk(
    world: _World,
    cfg: GeneratorConfig,
    rng: np.random.Generator,
    target: int,
    t0: float,
    t1: float,
) -> dict[str, np.ndarray]:
    """About `target` events of sessions starting in [t0, t1) seconds, sorted by time."""
    carts = cfg.cart_rate * (1 + cfg.purchase_rate + (1 - cfg.purchase_rate) * cfg.remove_rate)
    n_sessions = max(1, round(target / (cfg.mean_views_per_session * (1 + carts))))
    starts = np.sort(rng.uniform(t0, t1, n_sessions))
    users = world.users(rng, n_sessions)
    lengths = rng.geometric(1.0 / cfg.mean_views_per_session, n_sessions)
    session = np.repeat(np.arange(n_sessions), lengths)
    view_user = users[session]
    candidates = world.items(rng, (len(session), _CANDIDATES))
    affinity = np.einsum(
        "vk,vck->vc", world.user_factors[view_user], world.item_factors[candidates]
    )
    pick = np.argmax(affinity + rng.gumbel(0, 0.5, affinity.shape), axis=1)
    items = candidates[np.arange(len(session)), pick]
    taste = affinity[np.arange(len(session)), pick]
    # Views within a session are spaced by ~40 s; the funnel follows each view.
    offsets = np.cumsum(rng.exponential(40.0, len(session)))
    first = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    offsets -= np.repeat(offsets[first], lengths)
    view_ts = starts[session] + offsets
    # Taste raises the cart probability around the configured average rate.
    logit = np.log(cfg.cart_rate / (1 - cfg.cart_rate)) + 1.5 * (taste - taste.mean())
    p_cart = 1 / (1 + np.exp(-logit))
    carted = rng.random(len(session)) < np.minimum(1.0, p_cart * cfg.cart_rate / p_cart.mean())
    bought = carted & (rng.random(len(session)) < cfg.purchase_rate)
    removed = carted & ~bought & (rng.random(len(session)) < cfg.remove_rate)
    parts = [
        (np.ones(len(session), bool), 0, view_ts),
        (carted, 1, view_ts + rng.exponential(20.0, len(session))),
        (removed, 2, view_ts + 25 + rng.exponential(60.0, len(session))),
        (bought, 3, view_ts + 25 + rng.exponential(90.0, len(session))),
    ]
    cols = {
        "user_id": np.concatenate([view_user[m] for m, _, _ in parts]),
        "item_id": np.concatenate([items[m] for m, _, _ in parts]),
        "event_code": np.concatenate([np.full(m.sum(), c, np.int8) for m, c, _ in parts]),
        "ts": np.concatenate([ts[m] for m, _, ts in parts]),
        "session": np.concatenate([session[m] for m, _, _ in parts]),
    }
    order = np.argsort(cols["ts"], kind="stable")
    return {k: v[order] for k, v in cols.items()}


def _lines(cols: dict[str, np.ndarray], world: _World, layout: str, session_base: int) -> bytes:
    """Render events in a preset layout with pyarrow string kernels."""
    ts = pa.array(cols["ts"].astype(np.int64), pa.timestamp("s", tz="UTC"))
    ts_ms = pa.array((cols["ts"] * 1000).astype(np.int64), pa.timestamp("ms", tz="UTC"))
    codes = cols["event_code"]
    event = pa.array(np.array(EVENT_TYPES)[codes])
    user = pa.array(cols["user_id"] + 1).cast(pa.string())  # ids start at 1, like real exports
    item = pa.array(cols["item_id"] + 1).cast(pa.string())
    sess = pa.array(cols["session"] + session_base).cast(pa.string())
    items = cols["item_id"]
    category = world.item_category[items]
    if layout == "jsonl":
        stamp = pc.strftime(ts, format="%Y-%m-%dT%H:%M:%SZ")
        pieces = ['{"user_id": ', user, ', "item_id": ', item, ', "event_type": "', event,
                  '", "timestamp": "', stamp, '", "session_id": "s', sess, '"}\n']  # fmt: skip
    elif layout == "rees46":
        pieces = [
            pc.strftime(ts, format="%Y-%m-%d %H:%M:%S UTC"), ",", event, ",", item, ",",
            pa.array(2053013550000000000 + category).cast(pa.string()), ",",
            pa.array(_CATEGORIES[np.where(items % 10 < 3, 0, category)]), ",",
            pa.array(_BRANDS[world.item_brand[items]]), ",",
            pa.array(world.item_price[items]).cast(pa.string()), ",", user, ",s", sess, "\n",
        ]  # fmt: skip
    elif layout == "retailrocket":
        names = np.array(["view", "addtocart", "", "transaction"])[codes]
        bought = codes == EVENT_TYPES.index("purchase")
        txn = pa.array(np.where(bought, (cols["session"] + session_base).astype(str), ""))
        pieces = [ts_ms.cast(pa.int64()).cast(pa.string()), ",", user, ",", pa.array(names),
                  ",", item, ",", txn, "\n"]  # fmt: skip
    elif layout == "taobao":
        names = pa.array(np.array(["pv", "cart", "", "buy"])[codes])
        pieces = [user, ",", item, ",", pa.array(1000 + category).cast(pa.string()), ",", names,
                  ",", ts.cast(pa.int64()).cast(pa.string()), "\n"]  # fmt: skip
    elif layout == "diginetica":
        known = pc.if_else(pa.array(cols["user_id"] % 3 == 0), user, "NA")  # most are anonymous
        of_day = ts_ms.cast(pa.int64()).to_numpy() % 86_400_000  # ms since the day's start
        pieces = [sess, ";", known, ";", item, ";", pa.array(of_day).cast(pa.string()), ";",
                  pc.strftime(ts, format="%Y-%m-%d"), "\n"]  # fmt: skip
    elif layout == "yoochoose":
        stamp = pc.strftime(ts_ms, format="%Y-%m-%dT%H:%M:%SZ")  # milliseconds, like the export
        pieces = [sess, ",", stamp, ",", item, ",0\n"]
    else:
        raise ValueError(
            f"no generator for layout {layout!r}; expected one of {', '.join(HEADERS)}"
        )
    joined = pc.binary_join_element_wise(*pieces, "")
    # Every row ends in "\n", so the string data buffer is already the file's bytes.
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32)[joined.offset :]
    data = joined.buffers()[2]
    return data.to_pybytes()[offsets[0] : offsets[len(joined)]]


CSV_HEADER = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
)
HEADERS = {
    "jsonl": "",
    "rees46": CSV_HEADER,
    "retailrocket": "timestamp,visitorid,event,itemid,transactionid\n",
    "taobao": "",
    "diginetica": "session_id;user_id;item_id;timeframe;eventdate\n",
    "yoochoose": "",
}
# Event codes (view, cart, remove_from_cart, purchase) that each layout can say.
EVENTS_OF = {"retailrocket": (0, 1, 3), "taobao": (0, 1, 3), "diginetica": (0,), "yoochoose": (0,)}


def generate(path: str | Path, cfg: GeneratorConfig | None = None) -> dict:
    """Write cfg.n_events events to `path` in cfg.layout and the ground truth beside it.

    Returns a summary (counts per event type, users, items, truth file).
    """
    cfg = cfg or GeneratorConfig()
    path = Path(path)
    layout = cfg.layout or ("rees46" if path.suffix == ".csv" else "jsonl")
    if layout not in HEADERS:
        raise ValueError(
            f"no generator for layout {layout!r}; expected one of {', '.join(HEADERS)}"
        )
    rng = np.random.default_rng(cfg.seed)
    world = _World(cfg, rng)
    fs = pafs.LocalFileSystem()
    # Whole or absent: benchmarks reuse a file that exists, so a cut-short one must not.
    with storage.atomic_output(fs, str(path.absolute())) as out:
        written, by_type, sessions = _write(out, world, cfg, layout, rng)
    truth = path.with_name(path.stem + ".truth.npz")
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        user_factors=world.user_factors,
        item_factors=world.item_factors,
        item_popularity=world.item_popularity,
        user_activity=world.user_activity,
    )
    storage.write_atomic(fs, str(truth.absolute()), buf.getvalue())
    n_users, n_items = cfg.sizes()
    summary = {
        "path": str(path),
        "layout": layout,
        "events": written,
        "events_by_type": dict(zip(EVENT_TYPES, by_type.tolist(), strict=True)),
        "users": n_users,
        "items": n_items,
        "sessions": sessions,
        "truth": str(truth),
        "config": asdict(cfg),
        "note": "user_id = row + 1 and item_id = row + 1 in the truth arrays",
    }
    truth_json = str(path.absolute().with_name(path.stem + ".truth.json"))
    storage.write_atomic(fs, truth_json, json.dumps(summary, indent=2).encode())
    return summary


def _write(
    out: pa.NativeFile, world: _World, cfg: GeneratorConfig, layout: str, rng: np.random.Generator
) -> tuple[int, np.ndarray, int]:
    t_start = np.datetime64(cfg.start, "s").astype(np.int64).item()
    span = cfg.days * 86400.0
    n_chunks = max(1, round(cfg.n_events / _CHUNK))
    target = -(-cfg.n_events // n_chunks)
    written, sessions = 0, 0
    by_type = np.zeros(len(EVENT_TYPES), np.int64)
    out.write(HEADERS[layout].encode())
    keep = EVENTS_OF.get(layout)
    step = 0
    while written < cfg.n_events:
        lo = t_start + span * min(step, n_chunks - 1) / n_chunks
        cols = _chunk(world, cfg, rng, target, lo, lo + span / n_chunks)
        if keep is not None:
            said = np.isin(cols["event_code"], keep)
            cols = {k: v[said] for k, v in cols.items()}
        take = min(len(cols["ts"]), cfg.n_events - written)
        cols = {k: v[:take] for k, v in cols.items()}
        out.write(_lines(cols, world, layout, sessions))
        by_type += np.bincount(cols["event_code"], minlength=len(EVENT_TYPES))
        sessions += int(cols["session"].max()) + 1 if take else 0
        written += take
        step += 1
        if step % 20 == 0:
            log.info("generated %d / %d events", written, cfg.n_events)
    return written, by_type, sessions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output file")
    parser.add_argument(
        "--layout", default="", choices=["", *HEADERS], help="default: .csv rees46, else jsonl"
    )
    parser.add_argument("--events", type=int, default=GeneratorConfig.n_events)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--items", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = GeneratorConfig(
        n_events=args.events,
        seed=args.seed,
        n_users=args.users,
        n_items=args.items,
        layout=args.layout,
    )
    print(json.dumps(generate(args.out, cfg), indent=2))


if __name__ == "__main__":
    main()
