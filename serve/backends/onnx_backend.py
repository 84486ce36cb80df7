"""ONNX Runtime backend: runs an exported ONNX model on CPU (fp32, int8 dynamic or calibrated; attention fused) or CUDA (fp32)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dmt_jepa.encoder_file import EncoderFileError, EncoderInfo
from dmt_jepa.export.io_names import IO_STYLES, IoNames, detect
from dmt_jepa.serve.backends.base import Backend, BackendError, backend_layers

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _session(model: Path | bytes, device: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
    # ORT's memory arena stays on: without it every run asks the system for its activations anew,
    # which cost 10 % of fp32 throughput (ViT-S, batch 32, 224 px: 14.5 against 16.0-16.6 images/s)
    # for 49 MiB less peak memory (758 against 807 MiB), measured on a 2-core AMD EPYC.
    options.enable_cpu_mem_arena = True
    if device == "cpu":
        # ORT's threads spin between the kernels of a run (fast) and, by default, for some 40 ms after
        # it, taking the cores the decode workers need. Spinning stops when a run returns. Measured
        # against no spinning at all (ViT-S fp32, 224 px, batch 32, 2-core AMD EPYC, 8 alternating
        # rounds, medians): model-only 14.83 against 13.29 images/s, the job 13.53 against 12.71.
        options.add_session_config_entry("session.force_spinning_stop", "1")
    providers: list = list(PROVIDERS[device])
    if device == "cuda":
        import torch

        providers[0] = ("CUDAExecutionProvider", {"device_id": torch.cuda.current_device()})
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    except Exception as err:  # ORT raises its own exception types, not exported under stable names
        raise BackendError(f"ONNX Runtime cannot load the model ({err}).") from err


def _stored_precision(path: Path, metadata: dict[str, str]) -> str:
    """The precision of the file's weights: its `precision` metadata (set by `dmtjepa export`), else from them."""
    if metadata.get("precision") in ("fp32", "fp16"):
        return metadata["precision"]
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    fp16 = any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    return "fp16" if fp16 else "fp32"


def _quantized(model: Path | bytes) -> bytes:
    """int8 weights for every MatMul and fused Attention (dynamic quantization: activations are quantised per batch)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        if isinstance(model, bytes):
            source.write_bytes(model)
        else:
            source = model
        logging.disable(logging.WARNING)  # the quantiser logs advice to the root logger, meant for its developers
        try:
            quantize_dynamic(
                source,
                out,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm", "Attention"],
                # Shape inference knows no types behind contrib ops such as Attention; ours are float32.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        finally:
            logging.disable(logging.NOTSET)
        return out.read_bytes()


def contract_info(inputs: list[str], outputs: list[str], metadata: dict[str, str], path: Path) -> tuple[EncoderInfo, IoNames]:
    """The encoder info and name set of an ONNX model in the project's contract; BackendError for any other model."""
    names = detect(inputs, outputs)
    if names is None:
        expected = "; or ".join(f"input {n.input!r} and outputs {n.outputs()}" for n in IO_STYLES.values())
        raise BackendError(
            f"{path} is not a dmt-jepa ONNX model (inputs {inputs}, outputs {outputs}; expected {expected}); "
            "export one with `dmtjepa export`."
        )
    try:
        return EncoderInfo.from_metadata(metadata, source=str(path)), names
    except EncoderFileError as err:
        raise BackendError(f"{err} Export the ONNX model with `dmtjepa export`.") from err


def read_contract(onnx_path: Path, shown: Path) -> tuple[EncoderInfo, IoNames, list[str], str]:
    """Encoder info, name set, output names and weight precision of an ONNX file, read without a session (`shown`: the name in errors)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError, OSError or its own types for a file that is not a model
        raise BackendError(f"cannot load {shown} as an ONNX model ({err}); export one with `dmtjepa export`.") from err
    initialisers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initialisers]
    outputs = [o.name for o in model.graph.output]
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    fp16 = any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    stored = metadata.get("precision") if metadata.get("precision") in ("fp32", "fp16") else "fp16" if fp16 else "fp32"
    info, names = contract_info(inputs, outputs, metadata, shown)
    return info, names, outputs, stored


def _calibrated(path: Path, info: EncoderInfo, notices: list[str]) -> tuple[bytes, str]:
    """int8 weights and activations with ranges calibrated on the scenes set (serve/calibration.py), cached, and
    its calibration key; a cache entry replaced is said in `notices`."""
    from dmt_jepa.serve.backends.choice import cache_dir
    from dmt_jepa.serve.calibration import DEFAULT_CALIBRATION_IMAGES, calibrated_int8, calibration_key, scene_pixels

    with tempfile.TemporaryDirectory() as tmp:
        pixels = scene_pixels(DEFAULT_CALIBRATION_IMAGES, info.img_size)
        out = calibrated_int8(path, pixels, info, Path(tmp) / "int8.onnx", cache=cache_dir(), notices=notices)
        return out.read_bytes(), calibration_key(path, pixels)


# A fused graph is kept only where every output is this close to the original's on a test batch.
FUSED_TOLERANCE = 1e-4


def _fused_attention(path: Path, original, info: EncoderInfo) -> tuple[bytes, object, int] | None:
    """The fp32 model with its attention fused (serve/backends/ort_attention.py), a CPU session of it and
    the count fused; None where nothing matched or the fused graph's outputs differ from the original's
    (max |difference| > FUSED_TOLERANCE * (1 + max |original|)) at the training size or a non-square other size."""
    import onnx

    from dmt_jepa.serve.backends.ort_attention import fuse_attention

    try:
        fused, count = fuse_attention(onnx.load(str(path)), info.num_heads)
        if count == 0:
            return None
        graph = fused.SerializeToString()  # a model over protobuf's 2 GiB cannot be: it runs as written
        session = _session(graph, "cpu")
    except Exception:  # the rewrite only saves time: whatever stops it, the graph runs as written
        return None
    name = original.get_inputs()[0].name
    height, width = info.img_size
    rng = np.random.default_rng(0)
    for size in ((height, width), (height + info.patch_size, max(info.patch_size, width - info.patch_size))):
        images = rng.standard_normal((2, 3, *size)).astype(np.float32)
        try:
            pairs = list(zip(original.run(None, {name: images}), session.run(None, {name: images}), strict=True))
        except Exception:  # ORT's own exception types: a fused graph it cannot run is simply not used
            return None
        for want, got in pairs:
            if got.shape != want.shape or np.abs(got - want).max() > FUSED_TOLERANCE * (1 + np.abs(want).max()):
                return None
    return graph, session, count


class OnnxRuntimeBackend(Backend):
    """An ONNX model in the project's contract, under either name set (export/io_names.py): token
    outputs [B, N, D] are reshaped to the [B, h, w, D] grid of the batch's own size, so both give the same arrays."""

    def __init__(self, path: Path, *, device: str, precision: str | None, layers: Sequence[int] | None = None):
        self.name, self.device, self.model_path = f"onnxruntime-{device}", device, path
        if device == "cuda":
            import onnxruntime as ort
            import torch

            if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
                raise BackendError("--backend onnxruntime-cuda needs onnxruntime-gpu and a CUDA GPU; use onnxruntime-cpu.")
        self.session = _session(path, device)
        self.info, self.names = self._read_contract(self.session, path)
        self.layers = backend_layers(self.info, layers)
        exported = {o.name for o in self.session.get_outputs()}
        missing = [i for i in self.layers if self.names.layer(i) not in exported]
        if missing:
            raise BackendError(
                f"{path} has no output for layers {missing}; export it with `dmtjepa export --layers` naming them."
            )
        self._outputs = self.names.outputs(self.layers)
        stored = _stored_precision(path, self.session.get_modelmeta().custom_metadata_map)
        allowed = {stored} | ({"int8", "int8-static"} if device == "cpu" and stored == "fp32" else set())
        precision = precision or stored
        if precision not in allowed:
            raise BackendError(
                f"{path} holds {stored} weights, which ONNX Runtime on {device} runs as "
                f"{' or '.join(sorted(allowed))}, "
                f"not {precision}; export the model in that precision or pick another backend."
            )
        self.precision, self._stored = precision, stored
        self._calibration_key: str | None = None  # int8-static: what its cached calibrated model was made from
        fusable = device == "cpu" and precision in ("fp32", "int8")
        fused = _fused_attention(path, self.session, self.info) if fusable else None
        self.fused_attention = fused[2] if fused else 0  # attention blocks running as ONNX Runtime's fused kernel
        if precision == "int8":
            self.session = _session(_quantized(fused[0] if fused else path), device)  # Attention -> QAttention
        elif precision == "int8-static":
            notices: list[str] = []
            calibrated, self._calibration_key = _calibrated(path, self.info, notices)
            self.session = _session(calibrated, device)
            self.notices = tuple(notices)
        elif fused:
            self.session = fused[1]
        self._input_dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def discard_cached(self) -> bool:
        from dmt_jepa.serve.backends.choice import cache_dir
        from dmt_jepa.serve.calibration import drop_cached

        return self._calibration_key is not None and drop_cached(cache_dir(), self._calibration_key)

    @staticmethod
    def _read_contract(session, path: Path) -> tuple[EncoderInfo, IoNames]:
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        return contract_info(inputs, outputs, session.get_modelmeta().custom_metadata_map, path)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        outputs = self.session.run(self._outputs, {self.names.input: images.astype(self._input_dtype, copy=False)})
        grid = (images.shape[2] // self.info.patch_size, images.shape[3] // self.info.patch_size)
        maps = [self.names.to_grid(out, grid) for i, out in enumerate(outputs) if i != 1]
        return tuple(out.astype(np.float32, copy=False) for out in (maps[0], outputs[1], *maps[1:]))

    def reference(self) -> Backend | None:
        if self.precision == self._stored:
            return None  # the file's own precision is what it was verified in at export
        return OnnxRuntimeBackend(self.model_path, device=self.device, precision=self._stored, layers=self.layers)
