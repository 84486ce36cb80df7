"""What an encoder file, an ONNX model or a TensorRT engine says about itself."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dmt_jepa.encoder_file import file_sha256, read_encoder_info
from export.errors import ExportError


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
        from export.tensorrt_build import read_sidecar

        return {"kind": "TensorRT engine sidecar", "file": str(path), **read_sidecar(path)}
    if path.suffix == ".engine":
        from export.tensorrt_build import read_sidecar

        sidecar = read_sidecar(path)
        # A rebuilt or copied engine next to a stale sidecar would otherwise be described wrongly.
        matches = file_sha256(path) == sidecar.get("engine_sha256")
        return {"kind": "TensorRT engine (from its sidecar)", "file": str(path), "matches_sidecar": matches, **sidecar}
    raise ExportError(
        f"cannot tell what {path.name} is; give an encoder .safetensors, an .onnx model or an .engine "
        "(with its .engine.json sidecar)."
    )


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
    elem = onnx.helper.tensor_dtype_to_np_dtype
    return {
        "kind": "ONNX model",
        "file": str(path),
        "sha256": file_sha256(path),
        "size_bytes": path.stat().st_size,
        "opset": {op.domain or "ai.onnx": op.version for op in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": {i.name: f"{elem(i.type.tensor_type.elem_type)} {_dims(i)}" for i in model.graph.input},
        "outputs": {o.name: f"{elem(o.type.tensor_type.elem_type)} {_dims(o)}" for o in model.graph.output},
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
