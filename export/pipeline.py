"""The whole export: encoder file -> verified ONNX (fp32, fp16) -> verified TensorRT engine."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dmt_jepa.encoder_file import read_encoder_info
from export.errors import ExportError
from export.onnx_export import DEFAULT_OPSET, OnnxExport, export_onnx
from export.profile import resolve_profile


@dataclass(frozen=True)
class ExportResult:
    """What was written, each file already verified."""

    onnx: list[OnnxExport]
    engine: Path | None = None
    sidecar: dict | None = None


def export_encoder(
    encoder_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fp16: bool = False,
    trt: bool = False,
    min_shape: str | None = None,
    opt_shape: str | None = None,
    max_shape: str | None = None,
    opset: int = DEFAULT_OPSET,
    layers: Sequence[int] | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export an encoder file to `out_dir`: encoder.onnx, with fp16 encoder_fp16.onnx, with trt encoder.engine.

    `layers` adds the outputs `layer_<i>` to the ONNX models (docs/export.md).
    """
    info = read_encoder_info(encoder_path)  # a wrong file fails here, before minutes of work
    if trt and layers:
        # The engine, its sidecar and the TensorRT backend bind exactly the contract's two outputs.
        raise ExportError("--layers applies to the ONNX models only; export the engine without --layers.")
    if not trt and (min_shape or opt_shape or max_shape):
        raise ExportError(
            "--min-shape, --opt-shape and --max-shape only apply to TensorRT engines; add --trt or drop them."
        )
    if not trt:
        return ExportResult(export_onnx(encoder_path, out_dir, fp16=fp16, opset=opset, layers=layers, log=log))

    from export.tensorrt_build import build_engine, precision_plan, require_gpu, require_tensorrt

    profile = resolve_profile(info, min_shape, opt_shape, max_shape)
    tensorrt = require_tensorrt()
    gpu_name = require_gpu()
    plan = precision_plan(tensorrt.__version__)
    exports = export_onnx(encoder_path, out_dir, fp16=fp16 or plan.onnx_precision == "fp16", opset=opset, log=log)
    paths = {e.precision: e.path for e in exports}
    engine, sidecar = build_engine(
        paths[plan.onnx_precision], paths["fp32"], out_dir, profile, plan, trt=tensorrt, gpu_name=gpu_name, log=log
    )
    return ExportResult(exports, engine, sidecar)
