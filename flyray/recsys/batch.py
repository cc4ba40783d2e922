"""Top-N recommendations for every user, written as parquet with Ray Data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from flyray import storage
from flyray.recsys.funksvd import FunkSVD


class _TopN:
    """Ray Data UDF holding the model once per actor."""

    def __init__(self, model_ref, n: int):
        self.model, self.n = ray.get(model_ref), n

    def __call__(self, batch: dict) -> dict:
        rows = batch["row"]
        items, scores = self.model.top_n_indexed(rows, self.n)
        n = items.shape[1]
        lo, hi = self.model.params.rating_min, self.model.params.rating_max
        return {
            "user_id": np.repeat(self.model.user_ids[rows], n),
            "rank": np.tile(np.arange(1, n + 1, dtype=np.int32), len(rows)),
            "item_id": self.model.item_ids[items.ravel()],
            "score": np.clip(scores.ravel(), lo, hi),
        }


def recommend_all(model: FunkSVD, output_uri: str, n: int = 10, batch_size: int = 2048) -> int:
    """Write user_id, rank, item_id, score for every user of the model; returns the row count."""
    if not ray.is_initialized():
        ray.init()
    fs, path = storage.filesystem(output_uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    users = pa.table({"row": np.arange(len(model.user_ids), dtype=np.int64)})
    workers = max(1, int(ray.available_resources().get("CPU", 1)))
    ds = ray.data.from_arrow(users).repartition(max(1, min(workers * 2, len(users) // 1000 + 1)))
    ds.map_batches(
        _TopN,
        fn_constructor_kwargs={"model_ref": ray.put(model), "n": n},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
        batch_format="numpy",
    ).write_parquet(path, filesystem=fs)
    return len(model.user_ids) * min(n, len(model.item_ids))
