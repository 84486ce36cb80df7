"""The values of the CLI's choice options, as Literal types: help lists them, shell completion offers them.

They are written out here rather than imported, because the modules that define them import torch
or numpy and `dmtjepa --help` must not; tests/test_cli_startup.py checks that each list equals the
one its package accepts.
"""

from __future__ import annotations

from typing import Literal

ExportFormat = Literal["onnx", "triton", "hf", "timm"]  # export.pipeline / export.weights.WEIGHT_FORMATS
IoNames = Literal["optimum", "legacy"]  # export.io_names.IO_STYLES
Backend = Literal[
    "auto", "torch-cpu", "torch-cuda", "onnxruntime-cpu", "onnxruntime-cuda", "openvino", "tensorrt"
]  # serve.backends.BACKENDS
Precision = Literal["fp32", "bf16", "fp16", "int8", "int8-static"]  # serve.backends.base.PRECISIONS
Resize = Literal["crop", "pad"]  # serve.images.RESIZE_POLICIES
Layout = Literal["tar", "array", "embedding-reader"]  # serve.layouts.LAYOUTS
Dtype = Literal["float32", "float16", "int8"]  # serve.quantize.DTYPES
Engine = Literal["local", "ray"]  # serve.job.ENGINES
Decode = Literal["cpu", "gpu"]  # serve.job.DECODES
SceneKind = Literal["digits", "shapes", "textures"]  # dmt_jepa.scenes.KINDS
SceneBackground = Literal["photo", "plain"]  # dmt_jepa.scenes.BACKGROUNDS
ScenePalette = Literal["colour", "mono"]  # dmt_jepa.scenes.PALETTES
LabelledFormat = Literal["voc", "ade20k", "cityscapes", "masks", "coco"]  # dmt_jepa.data.labelled_formats.FORMATS
