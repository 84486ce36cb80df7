"""Shared pieces of the pretraining tests: image folders, shards and a tiny config."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

NANO = "vit_nano"  # 4 blocks, 64 wide: every code path, in seconds on 2 CPU cores


def make_images(folder: Path, count: int, *, seed: int = 0, classes: int = 0) -> list[Path]:
    """`count` random images of varied sizes and formats (PNG, JPEG, WebP), in class subfolders if asked."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        sub = folder / f"class{i % classes}" if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (40 + i % 7 * 5, 48 + i % 5 * 6, 3), dtype=np.uint8)
        path = sub / f"img{i:03d}.{('png', 'jpg', 'webp')[i % 3]}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def tiny_overrides(shards: str, out_dir: Path, *extra: str) -> list[str]:
    """Config overrides for vit_nano at 64 px that trains a handful of steps in seconds."""
    return [
        f"data.train={shards}",
        "data.samples_per_epoch=16",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        f"model.arch={NANO}",
        "model.img_size=64",
        "model.pred_width=32",
        "model.pred_depth=1",
        "mask.min_keep=2",
        "target.aggregation=cross_attention",  # the paper's head: the path with the most parts (heads, context path)
        "target.head_depth=1",
        "optimization.epochs=2",
        "optimization.batch_size=4",
        "optimization.warmup_epochs=1",
        "run.checkpoint_every=2",
        "run.keep_checkpoints=10",
        "run.progress=false",
        "run.log_every=1",
        f"run.out_dir={out_dir}",
        *extra,
    ]


def small_shards(root: Path, count: int = 16) -> str:
    """`count` mixed-format images packed 8 to a shard under root: the shard pattern."""
    from dmt_jepa.data import pack_images

    make_images(root / "images", count)
    pack_images(root / "images", root / "shards", max_shard_count=8)
    return str(root / "shards" / f"shard-{{000000..{(count - 1) // 8:06d}}}.tar")
