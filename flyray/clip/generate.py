"""Offline demo inputs: a labelled image folder of coloured shapes, and a tiny CLIP model.

    python -m flyray.clip.generate .data/clip/shapes --per-class 60 [--tiny-model .data/clip/tiny]

Nothing is downloaded: the images are drawn with PIL, and the tiny model is a randomly
initialised CLIPModel built from a small CLIPConfig and saved with save_pretrained, so every
code path that loads `openai/clip-vit-base-patch32` on a cluster runs here on a local directory.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageDraw

from flyray import storage
from flyray.clip.embed import ModelUnavailable

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
DEMO_CLASSES = ("red_circle", "green_square", "blue_triangle", "yellow_circle")


def draw_shape(label: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of class `colour_shape`: jittered colour, position and size on a noisy ground."""
    colour_name, shape = label.split("_", 1)
    if colour_name not in COLOURS or shape not in SHAPES:
        raise ValueError(
            f"unknown class {label!r}: expected <colour>_<shape> from "
            f"{sorted(COLOURS)} x {list(SHAPES)}"
        )
    ground = rng.integers(90, 170, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(ground)
    colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in COLOURS[colour_name])
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def generate_shapes(
    root: str,
    classes: tuple[str, ...] = DEMO_CLASSES,
    per_class: int = 60,
    size: int = 64,
    seed: int = 0,
) -> list[str]:
    """Write `root/<class>/<n>.png` (local or s3://); deterministic for a seed. Returns paths."""
    rng = np.random.default_rng(seed)
    fs, base = storage.filesystem(root)
    written = []
    for label in classes:
        for n in range(per_class):
            buf = io.BytesIO()
            draw_shape(label, rng, size).save(buf, format="PNG")
            storage.write_atomic(fs, f"{base}/{label}/{n:05d}.png", buf.getvalue())
            written.append(storage.join(root, label, f"{n:05d}.png"))
    return written


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, patch_size=8)  # fmt: skip
# The vision tower of openai/clip-vit-base-patch32: same shapes, so the same compute per image.
VIT_B32_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, patch_size=32)  # fmt: skip


def build_random_clip(
    directory: str,
    vision: dict = TINY_VISION,
    image_size: int = 32,
    projection_dim: int = 32,
    seed: int = 0,
) -> str:
    """A randomly initialised CLIP with its processor, saved to `directory` (a tiny text tower:
    only images are embedded here). Its weights are random, so its embeddings keep colour and
    layout but know no concepts: enough to exercise loading, batching, training and timing
    offline, not to judge CLIP itself."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=64, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(vision, image_size=image_size),
        projection_dim=projection_dim,
    )  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    # A three-token vocabulary: the tokenizer is saved for CLIPProcessor, never used on text.
    tokenizer = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2}, merges=[])
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size=crop), tokenizer=tokenizer
    )
    processor.save_pretrained(directory)
    return str(Path(directory).absolute())


def build_tiny_clip(directory: str, seed: int = 0) -> str:
    """32-pixel input, 32-dimensional embeddings, about 50k parameters: for tests and demos."""
    return build_random_clip(directory, seed=seed)


def demo_model(directory: str) -> str:
    """The tiny CLIP at `directory` (local or s3://), built once and marked complete: the model
    of the demo images when `--model` is left empty, so the workflow's defaults run offline."""
    if storage.is_complete(directory):
        return directory
    if storage.is_s3(directory):
        with tempfile.TemporaryDirectory() as local:
            build_tiny_clip(local)
            fs, path = storage.filesystem(directory)
            pafs.copy_files(local, path, destination_filesystem=fs)
    else:
        build_tiny_clip(directory)
    storage.mark_complete(directory)
    return directory


def demo_inputs(
    source: str, model: str, demo_root: str, per_class: int, seed: int
) -> tuple[str, str]:
    """(image folder, model) of a run: an empty `source` is the demo shapes, generated under
    `demo_root`, and an empty `model` the tiny demo CLIP beside them, which knows nothing of
    real images: a real `source` must name its model."""
    if not model and source:
        raise ModelUnavailable(
            f"--source {source} needs --model: a saved CLIP folder, an s3:// prefix holding "
            "one, or a hub id (the empty default is the demo's untrained tiny CLIP)"
        )
    root = source or storage.join(demo_root, f"shapes-{per_class}-{seed}")
    if not source:
        generate_shapes(root, per_class=per_class, seed=seed)
    return root, model or demo_model(storage.join(demo_root, "tiny-clip"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="output folder (local or s3://)")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny-model", default="", help="also save a tiny CLIP model here")
    args = parser.parse_args()
    paths = generate_shapes(args.root, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"{len(paths)} images in {args.root} ({', '.join(DEMO_CLASSES)})")
    if args.tiny_model:
        print(f"tiny CLIP model in {build_tiny_clip(args.tiny_model)}")


if __name__ == "__main__":
    main()
