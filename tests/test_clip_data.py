"""CLIP data path: class folders and rejects, embeddings (actor pool, cache, s3://), splits,
GPU selection."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from clip_helpers import CLASSES, shapes_with_bad_files, tiny_clip  # noqa: F401
from PIL import Image

from flyray import storage
from flyray.clip.classifier import use_gpu
from flyray.clip.embed import (
    ClipEmbedder,
    ModelUnavailable,
    PoolPlan,
    cache_key,
    check_model,
    embed_folder,
    embed_paths,
    matrix,
    pick_device,
    plan_pool,
)
from flyray.clip.generate import demo_inputs, generate_shapes
from flyray.clip.images import split_embeddings
from flyray.images import decode, list_images


def test_listing_takes_classes_from_folders_and_rejects_other_files(tmp_path):
    expected = shapes_with_bad_files(tmp_path, per_class=3)
    listing = list_images(str(tmp_path))
    assert sorted(set(listing.labels)) == sorted(CLASSES)
    assert len(listing.paths) == 3 * 3 + 3  # the undecodable ones are only found when decoded
    by_path = {r["path"]: r["reason"] for r in listing.rejects}
    assert by_path == {p: r for p, r in expected.items() if r != "undecodable"}
    for path, label in zip(listing.paths, listing.labels, strict=True):
        assert path.split("/")[-2] == label


def test_decode_names_what_is_wrong():
    with pytest.raises(ValueError, match="not an image format"):
        decode(b"plain text")
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="truncated"):
        decode(buf.getvalue()[:-30])
    assert decode(buf.getvalue()).getpixel((5, 5)) == (10, 200, 30)


@pytest.mark.usefixtures("ray_cluster")
def test_embed_folder_counts_rejects_and_reuses_its_cache(tmp_path, tiny_clip):  # noqa: F811
    images = tmp_path / "images"
    expected = shapes_with_bad_files(images, per_class=8)
    cache = str(tmp_path / "cache")
    result = embed_folder(str(images), tiny_clip, cache, batch_size=8)
    assert not result.reused
    assert (result.images, result.embedded, result.rejected) == (3 * 8 + 5, 3 * 8, 5)
    assert result.dim == 32
    assert result.rejected_by_reason == {
        "undecodable": 3,
        "not_an_image_file": 1,
        "no_class_folder": 1,
    }
    assert {f.split(": ")[0] for f in result.rejected_files} == set(expected)
    rejects = pq.read_table(result.rejects_uri).to_pylist()
    assert {r["path"]: r["reason"] for r in rejects} == expected
    assert {r["label"] for r in rejects if r["reason"] == "undecodable"} == set(CLASSES)

    table = pq.read_table(result.embeddings_uri)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    x = matrix(table)
    assert x.shape == (24, 32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    # the pool computes what one in-process embedder computes, file by file
    first = [decode(Path(p).read_bytes()) for p in table["path"].to_pylist()[:5]]
    np.testing.assert_allclose(ClipEmbedder(tiny_clip).embed(first), x[:5], atol=1e-5)
    local = embed_paths(table["path"].to_pylist(), tiny_clip, 8, 0, in_process=True)
    np.testing.assert_allclose(np.stack(local["embedding"].to_pylist()), x, atol=1e-5)

    marker = tmp_path / "cache" / result.cache_dir.rsplit("/", 1)[-1] / "embeddings.parquet"
    written = marker.stat().st_mtime_ns
    again = embed_folder(str(images), tiny_clip, cache, batch_size=8)
    assert again.reused and again.cache_dir == result.cache_dir
    assert marker.stat().st_mtime_ns == written  # not rewritten

    # A damaged cache is never trusted: a cut-short or garbled marker, or a file that changed
    # since the marker was written, and the embeddings are computed again.
    folder = Path(result.cache_dir)
    success = (folder / "_SUCCESS").read_bytes()
    for damage in (
        lambda: (folder / "_SUCCESS").write_bytes(success[: len(success) // 2]),
        lambda: (folder / "_SUCCESS").write_bytes(success.replace(b"rejects", b"rejectz")),
        lambda: (folder / "result.json").write_bytes(b"{"),
    ):
        damage()
        rebuilt = embed_folder(str(images), tiny_clip, cache, batch_size=8, in_process=True)
        assert not rebuilt.reused and rebuilt.embedded == result.embedded
        assert embed_folder(str(images), tiny_clip, cache, batch_size=8).reused

    (images / "red_circle" / "00000.png").write_bytes(
        (images / "red_circle" / "00001.png").read_bytes()
    )
    key = cache_key(tiny_clip, list_images(str(images)).fingerprint)
    assert key != result.cache_dir.rsplit("/", 1)[-1]  # new content: embedded again


def test_embed_folder_on_s3(s3_env, tmp_path, tiny_clip):  # noqa: F811
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(
        Bucket="clip-data"
    )
    fs = storage.s3_filesystem()
    generate_shapes("s3://clip-data/shapes", classes=CLASSES[:2], per_class=3)
    with fs.open_output_stream("clip-data/shapes/red_circle/broken.png") as out:
        out.write(b"\x89PNG broken")
    pafs.copy_files(tiny_clip, "clip-data/tiny", destination_filesystem=fs)
    result = embed_folder("s3://clip-data/shapes", "s3://clip-data/tiny", "s3://clip-data/cache")
    assert (result.embedded, result.rejected) == (6, 1)
    assert result.embeddings_uri.startswith("s3://clip-data/cache/")
    table = pq.read_table(result.embeddings_uri.removeprefix("s3://"), filesystem=fs)
    assert all(p.startswith("s3://clip-data/shapes/") for p in table["path"].to_pylist())
    assert result.rejected_files[0].startswith("s3://clip-data/shapes/red_circle/broken.png")
    assert embed_folder("s3://clip-data/shapes", "s3://clip-data/tiny",
                        "s3://clip-data/cache").reused  # fmt: skip
    with pytest.raises(
        ModelUnavailable,
        match=r"s3://clip-data/shapes: no config.json in that folder; pass --model",
    ):
        embed_folder("s3://clip-data/shapes", "s3://clip-data/shapes", "s3://clip-data/cache")


def test_a_model_that_cannot_load_fails_once_before_any_actor_naming_what_to_pass(tmp_path):
    images = tmp_path / "images"
    generate_shapes(str(images), classes=CLASSES[:2], per_class=2)
    cache = tmp_path / "cache"
    # No hub here (HF_HUB_OFFLINE, as on a cluster pod without egress): the driver's config
    # load fails, so no actor is started and nothing is written.
    with pytest.raises(ModelUnavailable) as hub:
        embed_folder(str(images), "openai/clip-vit-base-patch32", str(cache))
    message = str(hub.value)
    assert message.startswith("CLIP model openai/clip-vit-base-patch32 cannot be loaded")
    assert "--model a folder written by save_pretrained or an s3:// prefix" in message
    assert "\n" not in message and not cache.exists()
    with pytest.raises(ModelUnavailable, match=r"\./no-such-model: not a folder; pass --model"):
        check_model("./no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="empty: no config.json in that folder"):
        check_model(str(tmp_path / "empty"))


def test_demo_defaults_need_nothing_downloaded(tmp_path):
    from transformers import CLIPModel

    root, model = demo_inputs("", "", str(tmp_path / "demo"), per_class=2, seed=0)
    assert root == str(tmp_path / "demo" / "shapes-2-0")
    assert len(list_images(root).paths) == 2 * 4
    check_model(model)
    assert CLIPModel.from_pretrained(model).config.projection_dim == 32
    built = (Path(model) / "model.safetensors").stat().st_mtime_ns
    assert demo_inputs("", "", str(tmp_path / "demo"), 2, 0)[1] == model  # built once
    assert (Path(model) / "model.safetensors").stat().st_mtime_ns == built
    with pytest.raises(ModelUnavailable, match="--source /data/dogs needs --model"):
        demo_inputs("/data/dogs", "", str(tmp_path / "demo"), 2, 0)


def test_gpu_is_used_only_when_visible():
    assert not torch.cuda.is_available()  # this machine: the CPU path must be the one taken
    assert pick_device() == "cpu"
    assert pick_device(cuda_available=True) == "cuda"
    assert plan_pool({"CPU": 2.0}) == PoolPlan(size=2, num_cpus=1, num_gpus=0)
    assert plan_pool({"CPU": 16.0}, max_actors=3) == PoolPlan(3, 1, 0)
    assert plan_pool({"CPU": 16.0, "GPU": 2.0}) == PoolPlan(size=2, num_cpus=1, num_gpus=1)
    assert plan_pool({"CPU": 16.0, "GPU": 4.0}, max_actors=1) == PoolPlan(1, 1, 1)
    assert not use_gpu({"CPU": 2.0}) and use_gpu({"CPU": 2.0, "GPU": 1.0})


def _table(labels: list[str]) -> pa.Table:
    x = np.arange(len(labels) * 4, dtype=np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x), 4)
    paths = [f"/d/{lab}/{i}.png" for i, lab in enumerate(labels)]
    return pa.table({"path": paths, "label": labels, "embedding": emb})


def test_split_is_stratified_and_the_label_map_comes_from_train():
    labels = ["cat"] * 20 + ["dog"] * 20 + ["emu"] * 20
    splits = split_embeddings(_table(labels), 0.2, 0.2, seed=3)
    assert splits.labels == ["cat", "dog", "emu"]
    assert (splits.train.num_rows, splits.validation.num_rows, splits.test.num_rows) == (36, 12, 12)
    for part in (splits.train, splits.validation, splits.test):
        idx = part["label_idx"].to_numpy()
        assert [splits.labels[i] for i in idx] == part["label"].to_pylist()
        assert np.bincount(idx).tolist() == [part.num_rows // 3] * 3
    seen = set()
    for part in (splits.train, splits.validation, splits.test):
        paths = set(part["path"].to_pylist())
        assert not paths & seen
        seen |= paths
    assert len(seen) == 60


def test_split_refuses_classes_too_small_to_split():
    with pytest.raises(ValueError, match=r"fewer than 5 images.*'emu': 2"):
        split_embeddings(_table(["cat"] * 10 + ["emu"] * 2))
    with pytest.raises(ValueError, match="at least 2 class folders"):
        split_embeddings(_table(["cat"] * 10))
