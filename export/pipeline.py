"""The whole export: encoder file -> verified ONNX (fp32, fp16) -> verified TensorRT engine."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dmt_jepa.encoder_file import read_encoder_info
from dmt_jepa.export.errors import ExportError
from dmt_jepa.export.io_names import DEFAULT_STYLE, io_names
from dmt_jepa.export.onnx_export import DEFAULT_OPSET, OnnxExport, export_onnx
from dmt_jepa.export.out_dir import replacing
from dmt_jepa.export.profile import resolve_profile


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
    io_style: str = DEFAULT_STYLE,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export an encoder file to `out_dir`: encoder.onnx, with fp16 encoder_fp16.onnx, with trt encoder.engine.

    `layers` adds one output per block to the ONNX models; `io_style` names the inputs and outputs
    ("optimum" or "legacy", export/io_names.py; docs/export.md). A folder holding an earlier export
    is refused unless `overwrite`, which removes the files that export listed in its manifest and
    this one does not rewrite; a non-empty folder with no manifest is refused (export/out_dir.py).
    """
    info = read_encoder_info(encoder_path)  # a wrong file fails here, before minutes of work
    try:
        io_names(io_style)
    except ValueError as err:
        raise ExportError(str(err)) from err
    if trt and layers:
        # The engine, its sidecar and the TensorRT backend bind exactly the contract's two outputs.
        raise ExportError("--layers applies to the ONNX models only; export the engine without --layers.")
    if not trt and (min_shape or opt_shape or max_shape):
        raise ExportError("--min-shape, --opt-shape and --max-shape only apply to TensorRT engines; add --trt or drop them.")
    if not trt:
        with replacing(out_dir, overwrite=overwrite, sources=(encoder_path,)):
            exports = export_onnx(encoder_path, out_dir, fp16=fp16, opset=opset, layers=layers, io_style=io_style, log=log)
        return ExportResult(exports)

    from dmt_jepa.export.tensorrt_build import build_engine, precision_plan, require_gpu, require_tensorrt

    profile = resolve_profile(info, min_shape, opt_shape, max_shape)
    tensorrt = require_tensorrt()
    gpu_name = require_gpu()
    plan = precision_plan(tensorrt.__version__)
    fp16 = fp16 or plan.onnx_precision == "fp16"
    with replacing(out_dir, overwrite=overwrite, sources=(encoder_path,)):
        exports = export_onnx(encoder_path, out_dir, fp16=fp16, opset=opset, io_style=io_style, log=log)
        paths = {e.precision: e.path for e in exports}
        engine, sidecar = build_engine(
            paths[plan.onnx_precision], paths["fp32"], out_dir, profile, plan, trt=tensorrt, gpu_name=gpu_name, log=log
        )
    return ExportResult(exports, engine, sidecar)
