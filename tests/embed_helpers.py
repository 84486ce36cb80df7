"""Shared builders for the embedding tests: a tiny encoder (file and ONNX), images and shards."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmt_jepa.encoder_file import info_from_encoder, save_encoder
from dmt_jepa.models import VisionTransformer

PATCH = 16
TRAIN_SIZE = 64  # a 4 x 4 grid


def tiny_encoder(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=TRAIN_SIZE, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2).eval()


def write_encoder_file(path: Path, seed: int = 0) -> Path:
    encoder = tiny_encoder(seed)
    return save_encoder(path, encoder, info_from_encoder(encoder, arch="vit_test"))


def write_onnx_model(path: Path, encoder: VisionTransformer, fp16: bool = False) -> Path:
    """An ONNX model as `dmtjepa export` writes it (names, dynamic B/H/W, metadata props), unverified."""
    from dmt_jepa.export.onnx_export import export_graph

    info = info_from_encoder(encoder, arch="vit_test")
    export_graph(encoder, info, path, {**info.to_metadata(), "precision": "fp16" if fp16 else "fp32"}, fp16=fp16)
    return path


def tiny_model_files(root: Path) -> dict[str, Path]:
    """The tiny encoder as an encoder file and as its ONNX export, keyed by model kind."""
    return {
        "encoder": write_encoder_file(root / "enc.safetensors"),
        "onnx": write_onnx_model(root / "enc.onnx", tiny_encoder()),
    }


def tiny_dense(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tiny encoder's fp32 PyTorch outputs: patch grid [B, h, w, D] and pooled [B, D]."""
    with torch.no_grad():
        grid, pooled = tiny_encoder().dense(torch.from_numpy(images))
    return grid.numpy(), pooled.numpy()


def image_bytes(height: int, width: int, fmt: str = "PNG", mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=None if mode != "CMYK" else None)
    if mode == "CMYK":
        image = Image.fromarray(pixels[..., :3]).convert("CMYK")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset tar: members KEY.EXT in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}" if ext else key)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def photo_samples(prefix: str, count: int, seed: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    """Good samples of varied size and format, each with a label member beside the image."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        height, width = (int(v) for v in rng.integers(40, 120, size=2))
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg")][i % 2]
        samples.append((f"{prefix}{i:04d}", {ext: image_bytes(height, width, fmt, seed=seed * 1000 + i), "cls": b"%d" % i}))
    return samples


def read_output(path: Path) -> dict[str, dict[str, bytes]]:
    """An output tar as {key: {extension: bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def huge_png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares an absurd size (a decompression bomb)."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
