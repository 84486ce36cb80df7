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

Calibrating takes ~10 s for ViT-S on 2 cores, at every job start, on every machine of a split job,
so `calibrated_int8` keeps each calibrated model in the user's cache folder (the one
serve/backends/choice.py uses, subfolder `int8/`), named by a hash of everything it is made from:
the fp32 graph's bytes, the calibration pixels, the quantiser's settings and the onnx and
onnxruntime versions. Every calibrated model also carries that key in its own metadata
(CALIBRATION_KEY_PROP), so an entry is bound to what it was made from by its content, not only by
its name. A cached file is used only when its bytes still hash to the content hash in its name
and the key inside is this one; it is copied out before use. An entry that fails (changed,
truncated, another model's graph copied or renamed in, one made before keys were stamped) is
deleted and the model calibrated again, with one line saying so among the backend's notices,
rather than run or left to fail every later run. A cache folder that cannot be read or written
only costs the time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
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
# Names the quantiser settings below in the cache key: change it with them.
QUANTISER_SETTINGS = "QDQ u8 activations, s8 per-channel symmetric weights, MinMax asymmetric, weight MatMuls only"
CACHE_FOLDER = "int8"
CACHE_ENTRIES = 8  # calibrated models kept (the least recently used go first); ViT-S's is ~22 MB
CACHE_NAME = re.compile(r"[0-9a-f]{64}-[0-9a-f]{32}\.onnx")  # calibration key, content hash
CALIBRATION_KEY_PROP = "dmt_jepa.calibration_key"  # the metadata entry of a calibrated model naming what made it


def scene_pixels(count: int, size: tuple[int, int], *, seed: int = 0) -> np.ndarray:
    """`count` uint8 [H, W, 3] scenes of the scenes set's train split, made at `size`."""
    from PIL import Image

    from dmt_jepa.scenes import make_scene

    side = max(size)
    images = []
    for index in range(count):
        image = make_scene("train", index, seed=seed, image_size=side).image
        if size[0] != size[1]:
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))
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


def quantize_static_int8(model_path: Path, pixels: np.ndarray, info: EncoderInfo, out_path: Path, key: str | None = None) -> Path:
    """Write the QDQ int8 form of the fp32 ONNX model at `model_path`, calibrated on uint8 `pixels` [N, H, W, 3];
    `key` (its `calibration_key`) is stamped into its metadata."""
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
    if key is not None:
        quantised.metadata_props.add(key=CALIBRATION_KEY_PROP, value=key)
    onnx.save(quantised, str(out_path))
    return out_path


def _library_versions() -> str:
    import onnxruntime

    return f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}"


def calibration_key(model_path: Path, pixels: np.ndarray) -> str:
    """Hex digest of everything a calibrated model is made from: graph bytes, pixels, settings, versions."""
    digest = hashlib.sha256()
    for part in (QUANTISER_SETTINGS, _library_versions(), f"{pixels.dtype} {pixels.shape}"):
        digest.update(part.encode() + b"\0")
    with open(model_path, "rb") as graph:
        while chunk := graph.read(1 << 22):
            digest.update(chunk)
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def _content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _cached_files(folder: Path) -> list[Path]:
    """The folder's regular files named as this module names a cached model, newest use first."""
    found = [entry for entry in folder.iterdir() if CACHE_NAME.fullmatch(entry.name)]
    found = [entry for entry in found if entry.is_file() and not entry.is_symlink()]
    return sorted(found, key=lambda entry: entry.stat().st_mtime, reverse=True)


def stamped_key(data: bytes) -> str | None:
    """The calibration key a calibrated model's bytes carry in their metadata; None where they carry none."""
    try:
        model = onnx.load_from_string(data)
    except Exception:  # onnx raises DecodeError or its own types for bytes that are not a model
        return None
    return next((prop.value for prop in model.metadata_props if prop.key == CALIBRATION_KEY_PROP), None)


def _entry_problem(entry: Path, key: str, limit: int) -> tuple[bytes | None, str | None]:
    """(the entry's bytes, None) where it is the model calibrated for `key`, else (None, what is wrong, in words)."""
    if entry.stat().st_size > limit:
        return None, "is larger than any model calibrated from this one"
    data = entry.read_bytes()
    if entry.name != f"{key}-{_content_hash(data)}.onnx":
        return None, "is damaged (its bytes do not match the hash in its name)"
    if stamped_key(data) != key:
        return None, "was not calibrated from this model with these settings (another model's, or an older form)"
    return data, None


def _read_cached(folder: Path, key: str, limit: int, notices: list[str]) -> bytes | None:
    """The cached model for `key`, verified; each entry under `key` that fails is deleted, and said in `notices`."""
    try:
        for entry in _cached_files(folder):
            if not entry.name.startswith(f"{key}-"):
                continue
            data, problem = _entry_problem(entry, key, limit)
            if problem is None:
                os.utime(entry)  # recently used: evicted last
                return data
            entry.unlink(missing_ok=True)
            notices.append(f"the cached int8 model {entry} {problem}; it was deleted and the model calibrated again")
    except OSError:
        return None
    return None


def _write_cached(folder: Path, key: str, data: bytes) -> None:
    """Store aside, then rename (readers never see a partial file); keep the CACHE_ENTRIES used last."""
    partial: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".int8-", suffix=".part", delete=False) as handle:
            partial = Path(handle.name)
            handle.write(data)
        os.replace(partial, folder / f"{key}-{_content_hash(data)}.onnx")
        partial = None
        for stale in _cached_files(folder)[CACHE_ENTRIES:]:
            stale.unlink(missing_ok=True)
    except OSError:
        pass  # a full disk or a folder we may not write: the model made now is still used
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)


def drop_cached(cache: Path | None, key: str) -> bool:
    """Delete the cache's entries for `key` (a model that failed its first-batch check); True where one was deleted."""
    if cache is None:
        return False
    dropped = False
    try:
        for entry in _cached_files(cache / CACHE_FOLDER):
            if entry.name.startswith(f"{key}-"):
                entry.unlink(missing_ok=True)
                dropped = True
    except OSError:
        pass
    return dropped


def calibrated_int8(
    model_path: Path,
    pixels: np.ndarray,
    info: EncoderInfo,
    out_path: Path,
    *,
    cache: Path | None,
    notices: list[str] | None = None,
) -> Path:
    """quantize_static_int8's model at `out_path`, stamped with its key, taken from the `cache` folder when made
    there before (None: no cache); a cached entry that fails its checks is replaced, one line in `notices` each."""
    key = calibration_key(model_path, pixels)
    if cache is None:
        return quantize_static_int8(model_path, pixels, info, out_path, key)
    folder = cache / CACHE_FOLDER
    # int8 weights make the QDQ model smaller than its fp32 source; a larger file is not one of ours.
    data = _read_cached(folder, key, model_path.stat().st_size + (1 << 20), [] if notices is None else notices)
    if data is None:
        data = quantize_static_int8(model_path, pixels, info, out_path, key).read_bytes()
        _write_cached(folder, key, data)
    else:
        out_path.write_bytes(data)
    return out_path
