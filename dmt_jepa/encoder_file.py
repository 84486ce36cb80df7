"""The encoder file: one safetensors file with the target encoder and what is needed to use it."""

from __future__ import annotations

import hashlib
import json
import math
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
            info = cls(
                arch=meta["arch"],
                patch_size=_integer(meta, "patch_size"),
                embed_dim=_integer(meta, "embed_dim"),
                depth=_integer(meta, "depth"),
                num_heads=_integer(meta, "num_heads"),
                mlp_ratio=_number(json.loads(meta["mlp_ratio"]), "mlp_ratio"),
                img_size=tuple(_integer(meta, "img_size", i) for i in range(2)),
                pixel_mean=tuple(_number(v, "pixel_mean") for v in _triple(meta, "pixel_mean")),
                pixel_std=tuple(_number(v, "pixel_std") for v in _triple(meta, "pixel_std")),
                provenance=json.loads(meta.get("provenance", "{}")),
                format_version=version,
            )
        except (KeyError, ValueError, TypeError) as err:
            raise EncoderFileError(f"{source} has incomplete encoder metadata ({err}).") from err
        problem = info.problem()
        if problem is not None:
            raise EncoderFileError(f"{source} has impossible encoder metadata: {problem}.")
        return info

    def problem(self) -> str | None:
        """What makes this description impossible to build, in words; None if it can be built."""
        if not isinstance(self.arch, str) or not self.arch:
            return "arch must be a name"
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                return f"{name} must be positive, not {getattr(self, name)}"
        if self.embed_dim % self.num_heads:
            return f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
        if not 0 < self.mlp_ratio <= 64 or int(self.embed_dim * self.mlp_ratio) < 1:
            return f"mlp_ratio must be in (0, 64], not {self.mlp_ratio}"
        if any(s < self.patch_size or s % self.patch_size for s in self.img_size):
            return f"img_size {list(self.img_size)} must be positive multiples of patch_size {self.patch_size}"
        if any(s <= 0 for s in self.pixel_std):
            return f"pixel_std must be positive, not {list(self.pixel_std)}"
        if not isinstance(self.provenance, dict):
            return "provenance must be a mapping"
        return None

    def parameter_count(self) -> int:
        """How many numbers the encoder this describes holds: what building it allocates."""
        dim, hidden = self.embed_dim, int(self.embed_dim * self.mlp_ratio)
        patch = dim * 3 * self.patch_size**2 + dim
        block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (2 * dim * hidden + hidden + dim)
        return patch + self.depth * block + 2 * dim


def _integer(meta: dict[str, str], key: str, index: int | None = None) -> int:
    value = json.loads(meta[key])
    if index is not None:
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"{key} must be [height, width], got {value!r}")
        value = value[index]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def _triple(meta: dict[str, str], key: str) -> list:
    value = json.loads(meta[key])
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError(f"{key} must be 3 numbers, got {value!r}")
    return value


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be finite numbers, got {value!r}")
    return float(value)


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
    """Rebuild the encoder from its file alone, in eval mode.

    Nothing is built before the metadata is found possible and the file is found to hold at least
    as many numbers as the encoder it describes, so that a small file that lies about its size
    cannot make us allocate a huge model; weights that are not finite are refused.
    """
    info = read_encoder_info(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        held = sum(math.prod(shape) for shape in shapes.values())
        patch = shapes.get("patch_embed.proj.weight")
        if held < info.parameter_count() or patch != [info.embed_dim, 3, info.patch_size, info.patch_size]:
            raise EncoderFileError(
                f"{path} does not hold the weights its metadata describes ({info.arch}, {info.embed_dim} wide, "
                f"{info.depth} blocks, patch {info.patch_size}: {info.parameter_count()} numbers; the file has "
                f"{held}, patch embedding {patch}); it is damaged or not an encoder file."
            )
        state = {}
        for key in shapes:
            tensor = f.get_tensor(key)
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise EncoderFileError(
                    f"{path} holds weights that are not finite numbers (NaN, inf or not floats) in {key}; "
                    "it is damaged: export the encoder again from a good checkpoint."
                )
            state[key] = tensor
    encoder = build_encoder(info)
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
