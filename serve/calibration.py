"""Calibrated (static) int8: an fp32 ONNX model -> a QDQ int8 model whose activation ranges come from real images.

Dynamic int8 (onnxruntime-cpu `int8`) measures each activation's range on every batch at run time;
static int8 measures the ranges once, on calibration images, and stores them in the graph as
QuantizeLinear/DequantizeLinear pairs. ONNX Runtime runs that graph with int8 kernels, and OpenVINO
reads the same pairs as its own int8 layers. Only the MatMuls with a weight operand (qkv, proj,
fc1, fc2) are quantised: attention's activation x activation products and every LayerNorm,
softmax and GELU stay float32. The patch embedding (a Conv on the normalised pixels) stays float32
too: quantising its input to 8 bits took the worst patch's cosine to fp32 from 0.999 to 0.987 on
the scenes (nearly flat patches lose their detail), for a layer that costs ~1% of the time.
docs/embed.md gives measured figures.

Calibration images are the built-in scenes set (dmt_jepa/scenes.py: real photos with digits on
them) at the model's training size unless the caller passes its own, e.g. a few hundred decoded
from the input shards.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from dmt_jepa.encoder_file import EncoderInfo
from dmt_jepa.serve.images import normalise

DEFAULT_CALIBRATION_IMAGES = 64
# One image per calibration run: min/max ranges do not depend on how the images are grouped (the
# same quantised model comes out for 1 or 8), while the calibration session, whose every tensor is
# also an output, holds a batch's activations at once: ViT-S at 224 px peaked at 4.5 GiB of RSS with
# 8 images a run, 1.7 GiB with one, in the same 10 s.
CALIBRATION_BATCH = 1


def scene_pixels(count: int, size: tuple[int, int], *, seed: int = 0) -> np.ndarray:
    """`count` uint8 [H, W, 3] scenes of the scenes set's train split, made at `size`."""
    from PIL import Image

    from dmt_jepa.scenes import make_scene

    side = max(size)
    images = []
    for index in range(count):
        image = make_scene("train", index, seed=seed, image_size=side).image
        if size[0] != size[1]:
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
        images.append(image)
    return np.stack(images)


class _Batches:
    """onnxruntime.quantization's CalibrationDataReader over normalised images, CALIBRATION_BATCH at a time."""

    def __init__(self, input_name: str, images: np.ndarray):
        self.input_name, self.images = input_name, images
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.images), CALIBRATION_BATCH):
            yield {self.input_name: self.images[start : start + CALIBRATION_BATCH]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes to quantise: Gemm and every MatMul with an initializer (a weight) operand."""
    weights = {init.name for init in model.graph.initializer}
    weights |= {node.output[0] for node in model.graph.node if node.op_type == "Constant"}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "Gemm" or (node.op_type == "MatMul" and any(i in weights for i in node.input))
    ]


def quantize_static_int8(model_path: Path, pixels: np.ndarray, info: EncoderInfo, out_path: Path) -> Path:
    """Write the QDQ int8 form of the fp32 ONNX model at `model_path`, calibrated on uint8 `pixels` [N, H, W, 3]."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(model_path))
    input_name = model.graph.input[0].name
    images = normalise(pixels, info.pixel_mean, info.pixel_std)
    logging.disable(logging.WARNING)  # the quantiser logs advice to the root logger, meant for its developers
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            # Shape inference and constant folding first, as the quantiser's documentation asks.
            quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
            nodes = weight_matmuls(onnx.load(str(prepared)))
            quantize_static(
                str(prepared),
                str(out_path),
                _Batches(input_name, images),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                nodes_to_quantize=nodes,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"CalibTensorRangeSymmetric": False, "WeightSymmetric": True},
            )
    finally:
        logging.disable(logging.NOTSET)
    quantised = onnx.load(str(out_path))
    quantised.metadata_props.clear()
    quantised.metadata_props.extend(model.metadata_props)  # the contract's metadata survives quantisation
    onnx.save(quantised, str(out_path))
    return out_path
