"""The encoder file: one safetensors file with the target encoder and what is needed to use it.

A file is trusted only as far as it is checked: its header (read and bounded without touching a
tensor) must describe exactly the tensors of the encoder its metadata claims, within the bounds of
`dmt_jepa.limits`, before any module is built; so a small file that lies about its size costs
nothing. `model_identity` names a model by its tensors and the metadata that changes its outputs,
not by the file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dmt_jepa.file_modes import as_umask_allows
from dmt_jepa.limits import MAX_DEPTH, MAX_EMBED_DIM, MAX_HEADS, MAX_IMG_SIZE, MAX_PATCH_SIZE
from dmt_jepa.models.vision_transformer import VisionTransformer

Floats3 = tuple[float, float, float]  # [R, G, B]

FORMAT_NAME = "dmt-jepa-encoder"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bytes per element of each safetensors dtype; the floating ones are those weights may have.
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_HEADER_BYTES = 16 << 20  # a ViT-22B header is under 1 MB
MAX_JSON_BYTES = 16 << 20  # a model directory's config.json
OUTPUT_FIELDS = ("arch", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "img_size", "pixel_mean", "pixel_std")
JSON_FIELDS = OUTPUT_FIELDS[1:] + ("provenance", "format_version")  # metadata values stored as JSON text
SIZE_LIMITS = {"patch_size": MAX_PATCH_SIZE, "embed_dim": MAX_EMBED_DIM, "depth": MAX_DEPTH, "num_heads": MAX_HEADS}


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
    def from_metadata(cls, meta: dict[str, str], source: str = "file") -> EncoderInfo:
        """The description in safetensors / ONNX metadata (str -> str, values JSON but `arch`)."""
        if meta.get("format") != FORMAT_NAME:
            raise EncoderFileError(f"{source} is not a dmt-jepa encoder file (no '{FORMAT_NAME}' metadata).")
        try:
            values = {k: meta[k] if k == "arch" else json.loads(meta[k]) for k in JSON_FIELDS + ("arch",) if k in meta}
        except (TypeError, ValueError, RecursionError) as err:  # RecursionError: JSON nested past Python's stack
            raise EncoderFileError(f"{source} has incomplete encoder metadata ({err}).") from err
        return cls.from_values(values, source)

    @classmethod
    def from_values(cls, values: dict, source: str = "file") -> EncoderInfo:
        """The description from decoded values (a model directory's config.json), each checked for type and bounds."""
        version = values.get("format_version", 0)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise EncoderFileError(
                f"{source} has encoder format version {version}, newer than this dmt-jepa reads "
                f"({FORMAT_VERSION}); upgrade dmt-jepa."
            )
        try:
            if isinstance(version, bool) or not isinstance(version, int):
                raise ValueError(f"format_version must be an integer, got {version!r}")
            info = cls(
                arch=values["arch"],
                patch_size=_integer(values, "patch_size"),
                embed_dim=_integer(values, "embed_dim"),
                depth=_integer(values, "depth"),
                num_heads=_integer(values, "num_heads"),
                mlp_ratio=_number(values["mlp_ratio"], "mlp_ratio"),
                img_size=(_integer(values, "img_size", 0), _integer(values, "img_size", 1)),
                pixel_mean=cast(Floats3, tuple(_number(v, "pixel_mean") for v in _triple(values, "pixel_mean"))),
                pixel_std=cast(Floats3, tuple(_number(v, "pixel_std") for v in _triple(values, "pixel_std"))),
                provenance=values.get("provenance", {}),
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
        for name, limit in SIZE_LIMITS.items():
            if getattr(self, name) < 1:
                return f"{name} must be positive, not {getattr(self, name)}"
            if getattr(self, name) > limit:
                return f"{name} must be at most {limit}, not {getattr(self, name)}"
        if self.embed_dim % self.num_heads:
            return f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
        if not 0 < self.mlp_ratio <= 64 or int(self.embed_dim * self.mlp_ratio) < 1:
            return f"mlp_ratio must be in (0, 64], not {self.mlp_ratio}"
        if any(s < self.patch_size or s % self.patch_size for s in self.img_size):
            return f"img_size {list(self.img_size)} must be positive multiples of patch_size {self.patch_size}"
        if any(s > MAX_IMG_SIZE for s in self.img_size):
            return f"img_size {list(self.img_size)} must be at most {MAX_IMG_SIZE} pixels a side"
        if any(s <= 0 for s in self.pixel_std):
            return f"pixel_std must be positive, not {list(self.pixel_std)}"
        if not isinstance(self.provenance, dict):
            return "provenance must be a mapping"
        return None


def _integer(values: dict, key: str, index: int | None = None) -> int:
    value = values[key]
    if index is not None:
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"{key} must be [height, width], got {value!r}")
        value = value[index]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def _triple(values: dict, key: str) -> list:
    value = values[key]
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
        img_size=cast("tuple[int, int]", tuple(encoder.img_size)),  # timm keeps [H, W]
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
    try:
        save_file(state, str(tmp), metadata=info.to_metadata())
        as_umask_allows(tmp)
    except BaseException:  # a full disk: the half-written file goes, an older file at `path` stays
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it; offsets are absolute in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors file says before its tensors: free-form metadata and the tensors' entries."""

    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """The header of a safetensors file, checked, without reading a tensor.

    The layout: an 8-byte little-endian length N, N bytes of JSON ({name: {dtype, shape,
    data_offsets}, "__metadata__": {str: str}}), then the tensors' bytes. N is bounded before it is
    read, and every entry must fit the file with as many bytes as its dtype and shape need.
    """
    path = Path(path)

    def damaged(problem: str) -> EncoderFileError:
        return EncoderFileError(f"{path} is not a safetensors encoder file ({problem}); it is damaged or not a model file.")

    try:
        status = path.stat()
        if not stat.S_ISREG(status.st_mode):
            raise damaged("it is not a regular file")
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or length > min(MAX_HEADER_BYTES, status.st_size - 8):
                raise damaged(f"its header length does not fit the file or exceeds {MAX_HEADER_BYTES} bytes")
            raw = f.read(length)
    except OSError as err:
        raise EncoderFileError(f"cannot read {path} ({err.strerror or err}); check the path and its permissions.") from err
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, or nested past Python's stack
        raise damaged("its header is not JSON") from err
    if not isinstance(header, dict):
        raise damaged("its header is not a mapping")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise damaged("its metadata is not a mapping of strings")
    data_start, data_size = 8 + length, status.st_size - 8 - length
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (
                dtype in SAFETENSORS_DTYPES
                and isinstance(shape, list)
                and all(map(_count, shape))
                and _count(begin)
                and _count(end)
                and begin <= end <= data_size
                and end - begin == math.prod(shape) * SAFETENSORS_DTYPES[dtype]
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise damaged(f"the entry of tensor {name!r} has no valid dtype, shape and offsets inside the file")
        tensors[name] = TensorEntry(dtype, tuple(shape), data_start + begin, data_start + end)
    return SafetensorsHeader(metadata, tensors)


def read_json_file(path: str | os.PathLike) -> object:
    """A JSON file of at most MAX_JSON_BYTES; only a regular file is opened (a FIFO or a device would never end)."""
    path = Path(path)
    try:
        status = path.stat()
        regular = stat.S_ISREG(status.st_mode) and status.st_size <= MAX_JSON_BYTES
        if regular:
            with open(path, "rb") as f:
                raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as err:
        raise EncoderFileError(f"cannot read {path} ({err.strerror or err}); check the path and its permissions.") from err
    if not regular:
        raise EncoderFileError(
            f"{path} is not a regular file of at most {MAX_JSON_BYTES} bytes; it is damaged or not a model's config."
        )
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, or nested past Python's stack
        raise EncoderFileError(f"{path} is not JSON ({err}); it is damaged or not a model's config.") from err


def read_encoder_header(path: str | os.PathLike) -> tuple[EncoderInfo, SafetensorsHeader]:
    """An encoder file's description (checked for type and bounds) and its header; no tensor is read."""
    path = Path(path)
    if not path.exists():
        raise EncoderFileError(f"encoder file {path} does not exist.")
    header = read_safetensors_header(path)
    return EncoderInfo.from_metadata(header.metadata, source=str(path)), header


def read_encoder_info(path: str | os.PathLike) -> EncoderInfo:
    """Read only the metadata of an encoder file."""
    return read_encoder_header(path)[0]


def encoder_shapes(info: EncoderInfo) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the encoder `info` describes; built on the meta device, nothing allocated."""
    with torch.device("meta"):
        encoder = build_encoder(info)
    return {name: tuple(tensor.shape) for name, tensor in encoder.state_dict().items()}


def check_weights(info: EncoderInfo, tensors: dict[str, TensorEntry], source: str, described_by: str = "its metadata") -> None:
    """EncoderFileError unless `tensors` are exactly the encoder's that `info` describes, each floating point."""
    expected = encoder_shapes(info)
    held = {name: entry.shape for name, entry in tensors.items()}
    if held != expected:
        wrong = [name for name in expected if name in held and held[name] != expected[name]]
        missing = [name for name in expected if name not in held]
        if wrong:
            first = f"{wrong[0]} is {list(held[wrong[0]])}, not {list(expected[wrong[0]])}"
        elif missing:
            first = f"{missing[0]} is missing"
        else:
            first = f"{next(name for name in held if name not in expected)} is not part of it"
        raise EncoderFileError(
            f"{source} does not hold the weights {described_by} describes ({info.arch}, {info.embed_dim} wide, "
            f"{info.depth} blocks, patch {info.patch_size}: {sum(map(math.prod, expected.values()))} numbers; "
            f"the file has {sum(map(math.prod, held.values()))}, and {first}); it is damaged or not an encoder file."
        )
    not_float = next((name for name, entry in tensors.items() if entry.dtype not in FLOAT_DTYPES), None)
    if not_float is not None:
        raise _not_finite(source, not_float)


def _not_finite(source: str | os.PathLike, name: str) -> EncoderFileError:
    return EncoderFileError(
        f"{source} holds weights that are not finite numbers (NaN, inf or not floats) in {name}; "
        "it is damaged: export the encoder again from a good checkpoint."
    )


def read_weights(path: str | os.PathLike, names) -> dict[str, torch.Tensor]:
    """The tensors `names` of a safetensors file whose header was checked, each refused unless finite."""
    state = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in names:
                tensor = f.get_tensor(key)
                if not torch.isfinite(tensor).all():
                    raise _not_finite(path, key)
                state[key] = tensor
    except (SafetensorError, OSError) as err:
        raise EncoderFileError(
            f"{path} is not a safetensors encoder file that can be read ({err}); it is damaged or not a model file."
        ) from err
    return state


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[VisionTransformer, EncoderInfo]:
    """Rebuild the encoder from its file alone, in eval mode.

    Nothing is built before the metadata is found possible and within bounds and the header is
    found to describe exactly the tensors of the encoder the metadata claims, so that a small file
    that lies about its size cannot make us allocate a huge model; weights that are not finite are
    refused.
    """
    info, header = read_encoder_header(path)
    check_weights(info, header.tensors, str(path))
    state = read_weights(path, header.tensors)
    encoder = build_encoder(info)
    encoder.load_state_dict(state)  # strict: every name and shape was checked against the header
    return encoder.to(device).eval(), info


def model_identity(path: str | os.PathLike) -> str:
    """Hex SHA-256 naming the model a file holds: equal for files whose outputs are equal by construction.

    Encoder files (.safetensors): the tensors' names, dtypes, shapes and bytes in name order, plus
    the metadata that changes outputs (OUTPUT_FIELDS: architecture, sizes, pixel mean/std);
    provenance, format version and the order in which safetensors wrote things are left out, so the
    same encoder written again (a resumed run with nothing left to do, an added licence) keeps its
    identity. ONNX models and TensorRT engines: the file's SHA-256, since their bytes are the
    compiled model (an engine differs per GPU and TensorRT version, an ONNX graph per exporter).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return file_sha256(path)
    info, header = read_encoder_header(path)
    described = asdict(info)
    digest = hashlib.sha256(json.dumps({k: described[k] for k in OUTPUT_FIELDS}, sort_keys=True).encode())
    with open(path, "rb") as f:
        for name in sorted(header.tensors):
            entry = header.tensors[name]
            digest.update(json.dumps([name, entry.dtype, list(entry.shape)]).encode())
            f.seek(entry.start)
            left = entry.end - entry.start
            while left:
                chunk = f.read(min(left, 1 << 20))
                assert chunk, f"{path} shrank while it was read"
                digest.update(chunk)
                left -= len(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, for provenance records."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
