"""The encoder file: one safetensors file with the target encoder and what is needed to use it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dmt_jepa.models.vision_transformer import VisionTransformer

FORMAT_NAME = "dmt-jepa-encoder"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderFileError(ValueError):
    """A path that is not a readable encoder file; the message is one sentence for the user."""


@dataclass
class EncoderInfo:
    """Everything the encoder file says about itself besides the weights."""

    arch: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    img_size: tuple[int, int]
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    provenance: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    def to_metadata(self) -> dict[str, str]:
        """Flat str -> str mapping (what safetensors and ONNX metadata props can hold)."""
        meta = {"format": FORMAT_NAME}
        for key, value in asdict(self).items():
            meta[key] = value if isinstance(value, str) else json.dumps(value)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "file") -> "EncoderInfo":
        if meta.get("format") != FORMAT_NAME:
            raise EncoderFileError(f"{source} is not a dmt-jepa encoder file (no '{FORMAT_NAME}' metadata).")
        version = int(json.loads(meta.get("format_version", "0")))
        if version > FORMAT_VERSION:
            raise EncoderFileError(
                f"{source} has encoder format version {version}, newer than this dmt-jepa reads "
                f"({FORMAT_VERSION}); upgrade dmt-jepa."
            )
        try:
            return cls(
                arch=meta["arch"],
                patch_size=int(json.loads(meta["patch_size"])),
                embed_dim=int(json.loads(meta["embed_dim"])),
                depth=int(json.loads(meta["depth"])),
                num_heads=int(json.loads(meta["num_heads"])),
                mlp_ratio=float(json.loads(meta["mlp_ratio"])),
                img_size=tuple(json.loads(meta["img_size"])),
                pixel_mean=tuple(json.loads(meta["pixel_mean"])),
                pixel_std=tuple(json.loads(meta["pixel_std"])),
                provenance=json.loads(meta.get("provenance", "{}")),
                format_version=version,
            )
        except (KeyError, ValueError, TypeError) as err:
            raise EncoderFileError(f"{source} has incomplete encoder metadata ({err}).") from err


def info_from_encoder(encoder: VisionTransformer, arch: str, provenance: dict | None = None) -> EncoderInfo:
    """Describe a live encoder."""
    return EncoderInfo(
        arch=arch,
        patch_size=encoder.patch_size,
        embed_dim=encoder.embed_dim,
        depth=encoder.depth,
        num_heads=encoder.num_heads,
        mlp_ratio=encoder.mlp_ratio,
        img_size=tuple(encoder.img_size),
        provenance=dict(provenance or {}),
    )


def build_encoder(info: EncoderInfo) -> VisionTransformer:
    """An untrained encoder with the architecture `info` describes."""
    return VisionTransformer(
        img_size=info.img_size,
        patch_size=info.patch_size,
        embed_dim=info.embed_dim,
        depth=info.depth,
        num_heads=info.num_heads,
        mlp_ratio=info.mlp_ratio,
    )


def save_encoder(path: str | os.PathLike, encoder: VisionTransformer, info: EncoderInfo) -> Path:
    """Write the encoder file atomically (write aside, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(tmp), metadata=info.to_metadata())
    os.replace(tmp, path)
    return path


def read_encoder_info(path: str | os.PathLike) -> EncoderInfo:
    """Read only the metadata of an encoder file."""
    path = Path(path)
    if not path.is_file():
        raise EncoderFileError(f"encoder file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise EncoderFileError(f"{path} is not a safetensors encoder file ({err}).") from err
    return EncoderInfo.from_metadata(meta, source=str(path))


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[VisionTransformer, EncoderInfo]:
    """Rebuild the encoder from its file alone, in eval mode."""
    info = read_encoder_info(path)
    encoder = build_encoder(info)
    state = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise EncoderFileError(f"{path} does not match its declared architecture {info.arch} ({err}).") from err
    if missing or unexpected:
        raise EncoderFileError(
            f"{path} does not match its declared architecture {info.arch} "
            f"({len(missing)} missing and {len(unexpected)} unexpected tensors)."
        )
    return encoder.to(device).eval(), info


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, for provenance records."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
