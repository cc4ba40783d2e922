"""Benchmark: CLIP embedding throughput of the Ray Data actor pool vs a plain loop, and the
classifier's TorchTrainer (DDP) vs one plain torch process.

    python -m bench.clip [--images 2000] [--batch-size 64] [--actors 1,2] [--epochs 10]
    python -m bench.clip --model openai/clip-vit-base-patch32   # a real CLIP (needs the hub)
    python -m bench.clip --quick                                 # small smoke run

1. Embedding: the same model and batch size (read, decode with PIL, CLIPProcessor, forward)
   in one process (torch on every core) and through the actor pool of flyray.clip.embed with
   1 and 2 actors (1 CPU, so 1 torch thread, each); wall time including model load and, for
   Ray, actor start-up, on a Ray instance already running.
2. Training: the classifier on those embeddings for --epochs with TorchTrainer (2 workers,
   gloo) and with a plain torch loop, same hyperparameters.
Images: generated coloured shapes (--size px); model: a tiny CLIP built offline by default.
Writes bench/results/clip.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from flyray.clip.classifier import ClassifierParams, ClipClassifier
from flyray.clip.classifier import train_classifier as ray_train
from flyray.clip.embed import ClipEmbedder, embed_paths, fixed_width, matrix
from flyray.clip.generate import (
    TINY_VISION,
    VIT_B32_VISION,
    build_random_clip,
    generate_shapes,
)
from flyray.clip.images import split_embeddings
from flyray.images import decode, list_images
from flyray.raytrain import DistributedConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def plain_loop(paths: list[str], model: str, batch_size: int) -> tuple[float, np.ndarray]:
    """The single-process reference: same reading, decoding, processor and model."""
    began = time.perf_counter()
    embedder = ClipEmbedder(model)
    out = []
    for i in range(0, len(paths), batch_size):
        out.append(
            embedder.embed([decode(Path(p).read_bytes()) for p in paths[i : i + batch_size]])
        )
    return time.perf_counter() - began, np.concatenate(out)


def plain_train(split, params: ClassifierParams) -> tuple[float, float]:
    """One process, plain torch: seconds and final validation accuracy."""
    torch.manual_seed(params.seed)
    x, y = torch.tensor(matrix(split.train)), torch.tensor(split.train["label_idx"].to_numpy())
    xv = torch.tensor(matrix(split.validation))
    yv = torch.tensor(split.validation["label_idx"].to_numpy())
    began = time.perf_counter()
    model = ClipClassifier(x.shape[1], len(split.labels), params.hidden, params.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    for _ in range(params.epochs):
        model.train()
        order = torch.randperm(len(y))
        for i in range(0, len(y), params.batch_size):
            b = order[i : i + params.batch_size]
            if len(b) < 2:
                continue
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(xv).argmax(1) == yv).float().mean())
    return time.perf_counter() - began, accuracy


ARCHS = {
    "tiny": dict(vision=TINY_VISION, image_size=32, projection_dim=32),
    "vit-b32": dict(vision=VIT_B32_VISION, image_size=224, projection_dim=512),
}


def embedding_rows(paths: list[str], model: str, batch_size: int, actors: list[int]):
    """images/s of the plain loop and of the actor pool per size; and the plain embeddings."""
    n = len(paths)
    seconds, reference = plain_loop(paths, model, batch_size)
    rows = {"plain loop": {"seconds": seconds, "images_per_s": n / seconds,
                           "torch_threads": torch.get_num_threads()}}  # fmt: skip
    for size in actors:
        began = time.perf_counter()
        table = embed_paths(paths, model, batch_size, max_actors=size).sort_by("path")
        seconds = time.perf_counter() - began
        got = np.stack(table["embedding"].to_pylist())
        rows[f"ray actors={size}"] = {
            "seconds": seconds, "images_per_s": n / seconds,
            "speed_vs_plain": (n / seconds) / rows["plain loop"]["images_per_s"],
            "max_abs_diff_vs_plain": float(np.abs(got - reference).max()),
        }  # fmt: skip
    return rows, reference


def training_rows(listing, reference: np.ndarray, model: str, epochs: int, work: Path) -> dict:
    table = fixed_width(pa.table({
        "path": listing.paths, "label": listing.labels,
        "embedding": pa.array(list(reference), pa.list_(pa.float32())),
    }))  # fmt: skip
    split = split_embeddings(table)
    params = ClassifierParams(epochs=epochs)
    seconds, accuracy = plain_train(split, params)
    rows = {"plain torch": {"seconds": seconds, "validation_accuracy": accuracy,
                            "train_rows": split.train.num_rows}}  # fmt: skip
    began = time.perf_counter()
    config = DistributedConfig(workers=2, checkpoint_uri=str(work / "ray-train"))
    trained = ray_train(split.train, split.validation, split.labels, model, params, config)
    rows["TorchTrainer 2 workers"] = {
        "seconds": time.perf_counter() - began,
        "validation_accuracy": trained.history[-1].validation_accuracy,
        "train_rows": split.train.num_rows,
    }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images, over 4 classes")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", default="1,2", help="actor pool sizes to time")
    parser.add_argument(
        "--archs", default="tiny,vit-b32", help="random CLIPs: tiny, vit-b32 (ViT-B/32's shapes)"
    )
    parser.add_argument("--model", default="", help="a CLIP hub id or directory instead")
    parser.add_argument("--epochs", type=int, default=10, help="classifier epochs (0: skip)")
    parser.add_argument("--quick", action="store_true", help="128 images, 3 epochs")
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs = 128, 3
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    """Images and models under `work` (removed afterwards), results to bench/results."""
    generate_shapes(str(work / "images"), per_class=args.images // 4, size=args.size, seed=0)
    listing = list_images(str(work / "images"))
    models = {args.model: args.model} if args.model else {
        arch: build_random_clip(str(work / arch), **ARCHS[arch]) for arch in args.archs.split(",")
    }  # fmt: skip
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    actors = [int(a) for a in args.actors.split(",")]
    embedding, training = {}, {}
    for name, model in models.items():
        embedding[name], reference = embedding_rows(listing.paths, model, args.batch_size, actors)
        if args.epochs and name == next(iter(models)):  # the classifier is the same size for all
            training = training_rows(listing, reference, model, args.epochs, work)
    ray.shutdown()

    n = len(listing.paths)
    result = {"images": n, "size": args.size, "batch_size": args.batch_size,
              "cpus": os.cpu_count(), "epochs": args.epochs, "embedding": embedding,
              "training": training}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "clip.json").write_text(json.dumps(result, indent=2))
    print(f"\nCLIP embedding: {n} images of {args.size}px, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'model':<10} {'path':<16} {'wall s':>8} {'images/s':>10} {'vs plain':>9}")
    for name, rows in embedding.items():
        for path, row in rows.items():
            print(f"{name:<10} {path:<16} {row['seconds']:>8.2f} {row['images_per_s']:>10.1f} "
                  f"{row.get('speed_vs_plain', 1.0):>8.2f}x")  # fmt: skip
    if training:
        rows = next(iter(training.values()))["train_rows"]
        print(f"\nClassifier training: {rows} rows, {args.epochs} epochs")
        print(f"{'path':<24} {'wall s':>8} {'val accuracy':>13}")
        for name, row in training.items():
            print(f"{name:<24} {row['seconds']:>8.2f} {row['validation_accuracy']:>13.3f}")
    print(f"\nwritten {RESULTS / 'clip.json'}")


if __name__ == "__main__":
    main()
