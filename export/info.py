"""What an encoder file, an ONNX model, a TensorRT engine or a model directory (hf, timm) says about itself."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from dmt_jepa.encoder_file import file_sha256, read_encoder_info, read_json_file, read_safetensors_header
from dmt_jepa.export.errors import ExportError
from dmt_jepa.hub import CONFIG_FILENAME, WEIGHTS_FILENAME, read_model_directory


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A nested description of `path`, chosen by its suffix (.safetensors, .onnx, .engine or its .json)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist; give an encoder .safetensors, an .onnx model or an .engine.")
    if path.suffix == ".safetensors":
        return _describe_encoder(path)
    if path.suffix == ".onnx":
        return _describe_onnx(path)
    if path.suffix == ".json":
        from dmt_jepa.export.tensorrt_build import read_sidecar

        return {"kind": "TensorRT engine sidecar", "file": str(path), **read_sidecar(path)}
    if path.suffix == ".engine":
        from dmt_jepa.export.tensorrt_build import read_sidecar

        sidecar = read_sidecar(path)
        # A rebuilt or copied engine next to a stale sidecar would otherwise be described wrongly.
        matches = file_sha256(path) == sidecar.get("engine_sha256")
        return {"kind": "TensorRT engine (from its sidecar)", "file": str(path), "matches_sidecar": matches, **sidecar}
    raise ExportError(
        f"cannot tell what {path.name} is; give an encoder .safetensors, an .onnx model or an .engine "
        "(with its .engine.json sidecar)."
    )


def is_model_directory(path: str | os.PathLike) -> bool:
    """A folder holding config.json and model.safetensors: what `dmtjepa export --format hf` or `timm` writes."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILENAME).exists() and (path / WEIGHTS_FILENAME).exists()


def describe_model_directory(path: str | os.PathLike) -> dict[str, Any]:
    """What a Hugging Face or timm model directory holds, its config checked against its weights' header."""
    path = Path(path)
    config = read_json_file(path / CONFIG_FILENAME)
    if isinstance(config, dict) and isinstance(config.get("model_args"), dict):
        return _describe_timm_directory(path, config)
    info, weights, header = read_model_directory(path)
    return {
        "kind": "Hugging Face model directory (dmt-jepa encoder)",
        "directory": str(path),
        "architecture": f"{info.arch}, patch {info.patch_size}, width {info.embed_dim}, {info.depth} blocks, "
        f"{info.num_heads} heads",
        "trained at": f"{info.img_size[0]}x{info.img_size[1]}",
        "weights": _weights_line(weights, header),
        "license": info.provenance.get("license", "unspecified"),
        "load with": f"dmt_jepa.from_pretrained({str(path)!r})",
        "metadata": info.to_metadata(),
    }


def _describe_timm_directory(path: Path, config: dict) -> dict[str, Any]:
    args = config["model_args"]
    pretrained = config.get("pretrained_cfg")
    if not isinstance(pretrained, dict):
        pretrained = {}
    weights = path / WEIGHTS_FILENAME
    return {
        "kind": "timm model directory",
        "directory": str(path),
        "architecture": f"{config.get('architecture')}, patch {args.get('patch_size')}, width {args.get('embed_dim')}, "
        f"{args.get('depth')} blocks, {args.get('num_heads')} heads",
        "trained at": "x".join(map(str, args.get("img_size") or [])) or "unknown",
        "weights": _weights_line(weights, read_safetensors_header(weights)),
        "license": pretrained.get("license", "unspecified"),
        "load with": f"timm.create_model('local-dir:{path}', pretrained=True)",
    }


def _weights_line(weights: Path, header) -> str:
    numbers = sum(math.prod(entry.shape) for entry in header.tensors.values())
    return f"{weights.name}: {len(header.tensors)} tensors, {numbers} numbers, {weights.stat().st_size} bytes"


def _describe_encoder(path: Path) -> dict[str, Any]:
    info = read_encoder_info(path)
    return {
        "kind": "dmt-jepa encoder file",
        "file": str(path),
        "sha256": file_sha256(path),
        "size_bytes": path.stat().st_size,
        "metadata": info.to_metadata(),
    }


def _dims(value_info) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _describe_onnx(path: Path) -> dict[str, Any]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as err:
        raise ExportError(f"{path} is not a readable ONNX model ({err}).") from err
    from dmt_jepa.export.io_names import detect

    elem = onnx.helper.tensor_dtype_to_np_dtype
    names = detect([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    return {
        "kind": "ONNX model",
        "file": str(path),
        "sha256": file_sha256(path),
        "size_bytes": path.stat().st_size,
        "opset": {op.domain or "ai.onnx": op.version for op in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": {i.name: f"{elem(i.type.tensor_type.elem_type)} {_dims(i)}" for i in model.graph.input},
        "outputs": {o.name: f"{elem(o.type.tensor_type.elem_type)} {_dims(o)}" for o in model.graph.output},
        "io_names": names.style if names is not None else "neither dmt-jepa name set",
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


def format_description(description: dict[str, Any], indent: int = 0) -> str:
    """Indented `key: value` lines; nested mappings one level deeper, lists of mappings as JSON lines."""
    lines = []
    pad = "  " * indent
    for key, value in description.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(format_description(value, indent + 1))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{pad}{key}:")
            lines.extend(f"{pad}  - {json.dumps(item)}" for item in value)
        else:
            lines.append(f"{pad}{key}: {value}")
    return "\n".join(line for line in lines if line)
