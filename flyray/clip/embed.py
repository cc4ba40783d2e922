"""CLIP image embeddings with a Ray Data actor pool, cached as parquet.

Each actor loads transformers' CLIPModel and CLIPProcessor once (a hub id, a local directory,
or an s3:// directory copied to local disk) on cuda when the actor sees a GPU, on cpu
otherwise; the pool asks Ray for GPUs only when the cluster has them. The output is keyed by
the model's and the image set's fingerprints, so a re-run over the same images reuses it, once
its verified _SUCCESS marker (storage.is_complete) says that the cache folder is whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

from flyray import storage
from flyray.images import REJECTS_SCHEMA, UNDECODABLE, list_images, read_image, reject
from flyray.raytrain import require_ray

log = logging.getLogger(__name__)
HUB_MODEL = "openai/clip-vit-base-patch32"  # the real CLIP, where the hub can be reached
FORMAT = "1"  # part of the cache key: bump when the embeddings' content changes
NAMED_REJECTS = 100  # rejected files named in the result; all of them are in rejects.parquet


def pick_device(cuda_available: bool | None = None) -> str:
    import torch

    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    return "cuda" if available else "cpu"


@dataclass(frozen=True)
class PoolPlan:
    """How many embedding actors, and what each asks Ray for."""

    size: int
    num_cpus: float
    num_gpus: float


def plan_pool(resources: dict[str, float], max_actors: int = 0) -> PoolPlan:
    """One actor per GPU when the cluster has GPUs, else one per CPU (each torch on 1 thread)."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return PoolPlan(min(gpus, max_actors or gpus), 1, 1)
    cpus = max(1, int(resources.get("CPU", 1)))
    return PoolPlan(min(cpus, max_actors or cpus), 1, 0)


def resolve_model(model: str) -> str:
    """A local model directory as an absolute path (actors run elsewhere); others unchanged."""
    return str(Path(model).absolute()) if Path(model).is_dir() else model


def local_model(model: str, filesystem: pafs.FileSystem | None = None) -> str:
    """A hub id or local directory as is; an s3:// directory copied to a local temp dir (through
    an S3 `filesystem` when given: Ray workers get the driver's, as they lack its environment)."""
    if not storage.is_s3(model):
        return model
    if isinstance(filesystem, pafs.S3FileSystem):
        fs, path = filesystem, model.removeprefix(storage.S3_PREFIX)
    else:
        fs, path = storage.filesystem(model)
    target = tempfile.mkdtemp(prefix="clip-model-")
    pafs.copy_files(path, target, source_filesystem=fs)
    return target


class ModelUnavailable(ValueError):
    """The CLIP model named by `--model` cannot be loaded where the task runs."""


def check_model(model: str) -> None:
    """Load the model's config here, once, before any actor starts: a hub id that this machine
    cannot reach (a cluster pod usually cannot) or a folder without a saved CLIP then fails
    with one message naming what to pass, not with a traceback from every actor's retries."""
    from transformers import CLIPConfig

    hint = (
        "pass --model a folder written by save_pretrained or an s3:// prefix holding one "
        "(`python -m flyray.clip.generate DIR --tiny-model MODEL_DIR` writes an offline demo "
        "model; leave --model empty with the demo images)"
    )
    fs, path = storage.filesystem(model)
    if storage.is_s3(model) or Path(model).is_dir():
        if fs.get_file_info(f"{path.rstrip('/')}/config.json").type != pafs.FileType.File:
            raise ModelUnavailable(f"CLIP model {model}: no config.json in that folder; {hint}")
        if storage.is_s3(model):
            return  # each actor copies it whole; the config alone is checked here
        source = str(Path(model).absolute())
    elif Path(model).exists() or model.startswith((".", "/", "~")):
        raise ModelUnavailable(f"CLIP model {model}: not a folder; {hint}")
    else:
        source = model
    try:
        CLIPConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailable(f"CLIP model {model} cannot be loaded ({cause}); {hint}") from None


def model_fingerprint(model: str) -> str:
    """Content digest of a model directory (local or s3://); a hub id stands for itself."""
    fs, path = storage.filesystem(model)
    if storage.is_s3(model) or fs.get_file_info(path).type == pafs.FileType.Directory:
        return storage.fingerprint(storage.list_input_files(model, ("",)))
    return f"hub:{model}"


class ClipEmbedder:
    """CLIP image features, L2-normalised (as CLIP compares them). Also a Ray Data UDF."""

    def __init__(
        self,
        model: str = HUB_MODEL,
        device: str | None = None,
        filesystem: pafs.FileSystem | None = None,
    ):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.torch = torch
        self.device = device or pick_device()
        self.fs = filesystem or pafs.LocalFileSystem()  # where the images (and s3 model) are
        source = local_model(model, filesystem)
        self.processor = CLIPProcessor.from_pretrained(source)
        self.model = CLIPModel.from_pretrained(source).to(self.device).eval()
        self.dim = int(self.model.config.projection_dim)

    def embed(self, images: list) -> np.ndarray:
        """(n, dim) float32 features of PIL images."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with self.torch.inference_mode():
            out = self.model.get_image_features(pixel_values=pixels.to(self.device))
            # transformers 5 returns the model output, 4.x the projected tensor itself
            features = out if isinstance(out, self.torch.Tensor) else out.pooler_output
            features = self.torch.nn.functional.normalize(features, dim=-1)
        return features.float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """path rows in; path, embedding (null when rejected), error ("" when not) out.

        The actor reads its files itself: a separate read stage would need CPUs that the pool
        holds on a small machine (Ray Data stalled that way here), and one bad file must not
        fail the read of the others.
        """
        images, ok, errors = [], [], []
        for path in batch["path"]:
            try:
                images.append(read_image(self.fs, path))
                ok.append(True)
                errors.append("")
            except (ValueError, OSError) as exc:
                ok.append(False)
                errors.append(str(exc))
        features = iter(self.embed(images))
        rows = [next(features).tolist() if good else None for good in ok]
        return pa.table(
            {
                "path": pa.array(batch["path"], pa.string()),
                "embedding": pa.array(rows, pa.list_(pa.float32())),
                "error": pa.array(errors, pa.string()),
            }
        )


@dataclass
class EmbeddingResult:
    """Where the embeddings of an image set are, and what was rejected on the way."""

    root: str
    model: str
    cache_dir: str
    embeddings_uri: str  # parquet: path, label, embedding
    rejects_uri: str  # parquet: path, label, reason, detail
    images: int  # files under the root
    embedded: int
    rejected: int
    dim: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rejected_files: list[str] = field(default_factory=list)  # "path: reason (detail)"
    seconds: float = 0.0
    fingerprint: str = ""  # images and model (tasks.clip.resolve_images), for lineage
    reused: bool = False


def fixed_width(table: pa.Table) -> pa.Table:
    """The embedding column as fixed_size_list<float32>[dim]: Ray Data and numpy see a matrix."""
    column = table["embedding"].combine_chunks()
    if not len(column):
        return table
    dim = len(column[0].as_py())
    flat = pa.FixedSizeListArray.from_arrays(pc.list_flatten(column), dim)
    return table.set_column(table.schema.get_field_index("embedding"), "embedding", flat)


def matrix(table: pa.Table) -> np.ndarray:
    """(rows, dim) float32 view of a fixed-width embedding column."""
    column = table["embedding"].combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)


def cache_key(model: str, image_fingerprint: str) -> str:
    return hashlib.sha256(
        f"{FORMAT}\0{model_fingerprint(model)}\0{image_fingerprint}".encode()
    ).hexdigest()[:32]


def embed_folder(
    root: str,
    model: str,
    cache_uri: str = ".data/clip-embeddings",
    batch_size: int = 64,
    max_actors: int = 0,
    in_process: bool = False,
) -> EmbeddingResult:
    """Embed every image of `root/<class>/` once per (model, image set) content."""
    check_model(model)
    listing = list_images(root)
    cache_dir = storage.join(cache_uri, cache_key(model, listing.fingerprint))
    fs, cache_path = storage.filesystem(cache_dir)
    if storage.is_complete(cache_dir):
        with fs.open_input_stream(f"{cache_path}/result.json") as fh:
            result = EmbeddingResult(**json.loads(fh.read()))
        result.reused = True
        log.info("clip: reusing %d embeddings in %s", result.embedded, cache_dir)
        return result

    began = time.perf_counter()
    table = embed_paths(listing.paths, model, batch_size, max_actors, in_process)
    label_of = dict(zip(listing.paths, listing.labels, strict=True))
    table = table.append_column("label", pa.array([label_of[p] for p in table["path"].to_pylist()]))
    table = table.sort_by("path")
    failed = pc.not_equal(table["error"], "")
    bad = table.filter(failed)
    rejects = listing.rejects + [
        reject(p, lab, UNDECODABLE, e)
        for p, lab, e in zip(
            bad["path"].to_pylist(), bad["label"].to_pylist(), bad["error"].to_pylist(), strict=True
        )
    ]
    good = fixed_width(table.filter(pc.invert(failed)).select(["path", "label", "embedding"]))
    storage.write_table(fs, f"{cache_path}/embeddings.parquet", good)
    rejects_table = pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA)
    storage.write_table(fs, f"{cache_path}/rejects.parquet", rejects_table)
    by_reason: dict[str, int] = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    result = EmbeddingResult(
        root=root,
        model=model,
        cache_dir=cache_dir,
        embeddings_uri=storage.join(cache_dir, "embeddings.parquet"),
        rejects_uri=storage.join(cache_dir, "rejects.parquet"),
        images=len(listing.paths) + len(listing.rejects),
        embedded=good.num_rows,
        rejected=len(rejects),
        dim=good.schema.field("embedding").type.list_size if good.num_rows else 0,
        rejected_by_reason=by_reason,
        rejected_files=[
            f"{r['path']}: {r['reason']} ({r['detail']})" for r in rejects[:NAMED_REJECTS]
        ],
        seconds=time.perf_counter() - began,
    )
    storage.write_atomic(fs, f"{cache_path}/result.json", json.dumps(asdict(result)).encode())
    storage.mark_complete(cache_dir)  # last: only a whole cache folder is ever reused
    log.info(
        "clip: embedded %d images (%d rejected) in %.1f s into %s",
        result.embedded,
        result.rejected,
        result.seconds,
        cache_dir,
    )
    return result


def embed_paths(
    paths: list[str], model: str, batch_size: int, max_actors: int, in_process: bool = False
) -> pa.Table:
    """path, embedding, error for every path, computed by a Ray Data actor pool, or in this
    process with `in_process` (faster on one small machine: see bench/clip.py)."""
    if in_process:
        embedder = ClipEmbedder(model, filesystem=storage.filesystem(paths[0])[0])
        return pa.concat_tables(
            embedder({"path": np.asarray(paths[i : i + batch_size], dtype=object)})
            for i in range(0, len(paths), batch_size)
        )
    require_ray()
    plan = plan_pool(ray.cluster_resources(), max_actors)
    blocks = max(1, min(len(paths) // batch_size, plan.size * 8))
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    out = ds.map_batches(
        ClipEmbedder,
        fn_constructor_kwargs={"model": model, "filesystem": storage.filesystem(paths[0])[0]},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.size),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )
    return pa.concat_tables(ray.get(list(out.to_arrow_refs())))
