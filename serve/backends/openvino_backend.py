"""OpenVINO backend: runs the exported ONNX model (or an encoder file, exported on load) on the CPU.

fp32 runs with OpenVINO's f32 inference precision; bf16 with its bf16 precision, only where the
CPU computes bf16 natively (AVX512-BF16 or AMX: elsewhere OpenVINO emulates it); int8 is the
calibrated QDQ model of serve/calibration.py, which OpenVINO runs with its own int8 kernels.
Each precision other than fp32 is checked against fp32 on the first batch like every backend; a
cached int8 model that fails that check is deleted from the cache, so the next run calibrates again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dmt_jepa.encoder_file import EncoderFileError, load_encoder
from dmt_jepa.precision import cpu_has_bf16
from dmt_jepa.serve.backends.base import Backend, BackendError, backend_layers

PRECISIONS = ("fp32", "bf16", "int8")
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 layers come from the QDQ graph


def require_openvino():
    """The openvino module, or BackendError saying how to install it."""
    try:
        import openvino
    except ImportError as err:
        raise BackendError('--backend openvino needs OpenVINO; install it with `pip install "dmt-jepa[openvino]"`.') from err
    return openvino


def _export_encoder(path: Path, folder: Path, layers: Sequence[int]) -> Path:
    """The encoder file as the ONNX graph `dmtjepa export` writes (unverified here: the first batch is checked)."""
    from dmt_jepa.export.onnx_export import export_graph

    encoder, info = load_encoder(path)
    onnx_path = folder / "encoder.onnx"
    export_graph(encoder, info, onnx_path, {**info.to_metadata(), "precision": "fp32"}, layers=list(layers))
    return onnx_path


class _Streams:
    """A compiled model and one infer request per stream: a batch is cut into one part per stream, run at once."""

    def __init__(self, compiled, outputs: Sequence[str]):
        self.streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.requests = [compiled.create_infer_request() for _ in range(self.streams)]
        self.ports = [compiled.output(name) for name in outputs]

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        parts = [part for part in np.array_split(batch, min(self.streams, len(batch))) if len(part)]
        started = []
        try:
            for request, part in zip(self.requests, parts):
                request.start_async({0: part})
                started.append(request)
        finally:
            for request in started:  # never leave a request running, even when another one failed to start
                request.wait()
        outputs: list[list[np.ndarray]] = [[] for _ in self.ports]
        for request in started:
            for collected, port in zip(outputs, self.ports, strict=True):
                collected.append(np.array(request.get_tensor(port).data, dtype=np.float32))  # a copy: the request is reused
        return [np.concatenate(collected) for collected in outputs]


class OpenVinoBackend(Backend):
    """An fp32 ONNX model in the project's contract, compiled by OpenVINO for the CPU."""

    def __init__(
        self,
        path: Path,
        *,
        precision: str | None,
        layers: Sequence[int] | None = None,
        calibration: np.ndarray | None = None,
        has_bf16: bool | None = None,
    ):
        """`calibration`: uint8 [N, H, W, 3] images for int8 (None: the scenes set); `has_bf16` None: ask the CPU."""
        ov = require_openvino()
        self.name, self.model_path = "openvino", path
        precision = precision or "fp32"
        if precision not in PRECISIONS:
            raise BackendError(f"OpenVINO runs {', '.join(PRECISIONS)}, not {precision}; pick one of those.")
        if precision == "bf16" and not (cpu_has_bf16() if has_bf16 is None else has_bf16):
            raise BackendError(
                "bf16 on OpenVINO needs a CPU with bf16 instructions (AVX512-BF16 or AMX) and this one has none; "
                "use --precision fp32 or int8."
            )
        self._scratch = tempfile.TemporaryDirectory(prefix="dmtjepa-openvino-")
        self._layers_requested = list(layers or [])
        if path.suffix.lower() == ".safetensors":
            try:
                info = load_encoder(path)[1]
            except EncoderFileError as err:
                raise BackendError(str(err)) from err
            self.layers = backend_layers(info, layers)
            self.onnx_path = _export_encoder(path, Path(self._scratch.name), self.layers)
        else:
            self.onnx_path = path
        from dmt_jepa.serve.backends.onnx_backend import read_contract

        self.info, self.names, outputs, stored = read_contract(self.onnx_path, path)
        if stored != "fp32":
            raise BackendError(
                f"{path} holds {stored} weights; OpenVINO takes the fp32 export (encoder.onnx) and lowers it itself."
            )
        self.layers = backend_layers(self.info, layers)
        missing = [i for i in self.layers if self.names.layer(i) not in outputs]
        if missing:
            raise BackendError(
                f"{path} has no output for layers {missing}; export it with `dmtjepa export --layers` naming them."
            )
        self._outputs = self.names.outputs(self.layers)
        self.precision, self._calibration = precision, calibration
        self._calibration_key: str | None = None  # int8: what its cached calibrated model was made from
        graph = self.onnx_path
        if precision == "int8":
            from dmt_jepa.serve.backends.choice import cache_dir
            from dmt_jepa.serve.calibration import DEFAULT_CALIBRATION_IMAGES, calibrated_int8, calibration_key, scene_pixels

            pixels = calibration if calibration is not None else scene_pixels(DEFAULT_CALIBRATION_IMAGES, self.info.img_size)
            notices: list[str] = []
            graph = calibrated_int8(
                self.onnx_path, pixels, self.info, Path(self._scratch.name) / "int8.onnx", cache=cache_dir(), notices=notices
            )
            self.notices = tuple(notices)
            self._calibration_key = calibration_key(self.onnx_path, pixels)
        self._core, self._graph = ov.Core(), graph
        # The job's model: uint8 pixels in, normalised inside. Compiled now, so that a bad model fails here;
        # the float-input model (`run`: tests, benchmarks, the Python API) only when first asked for.
        self._pixels = self._compile(pixels=True)
        self._float: _Streams | None = None
        self.streams = self._pixels.streams

    def _compile(self, *, pixels: bool) -> _Streams:
        """The model compiled for float NCHW input, or (`pixels`) for uint8 NHWC pixels it normalises itself."""
        try:
            model = self._core.read_model(str(self._graph))
            if pixels:
                from openvino import Layout, Type
                from openvino.preprocess import PrePostProcessor

                # Conversion, normalisation and the NHWC -> NCHW transpose become the graph's first
                # nodes: they run on every core with the model, not in numpy before it on one.
                ppp = PrePostProcessor(model)
                ppp.input().tensor().set_element_type(Type.u8).set_layout(Layout("NHWC"))
                ppp.input().model().set_layout(Layout("NCHW"))
                ppp.input().preprocess().convert_element_type(Type.f32).mean([255.0 * m for m in self.info.pixel_mean]).scale(
                    [255.0 * s for s in self.info.pixel_std]
                )
                model = ppp.build()
            # THROUGHPUT: OpenVINO splits the cores into streams of a few threads each (one stream per
            # core on a 2-core CPU); each batch is cut into one part per stream, run at once. Streams
            # do not wait for each other, so a decode burst on one core slows one part instead of
            # stalling every thread of one LATENCY stream at its next barrier.
            compiled = self._core.compile_model(
                model, "CPU", {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[self.precision], "PERFORMANCE_HINT": "THROUGHPUT"}
            )
        except RuntimeError as err:  # OpenVINO reports every load failure as a RuntimeError
            raise BackendError(f"OpenVINO cannot load the model ({str(err).splitlines()[0]}).") from err
        return _Streams(compiled, self._outputs)

    def _maps(self, outputs: list[np.ndarray], height: int, width: int) -> tuple[np.ndarray, ...]:
        grid = (height // self.info.patch_size, width // self.info.patch_size)
        maps = [self.names.to_grid(out, grid) for i, out in enumerate(outputs) if i != 1]  # output 1: pooled
        return (maps[0], outputs[1], *maps[1:])

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        if self._float is None:
            self._float = self._compile(pixels=False)
        return self._maps(self._float(np.ascontiguousarray(images, dtype=np.float32)), *images.shape[2:])

    def run_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
        return self._maps(self._pixels(np.ascontiguousarray(pixels, dtype=np.uint8)), *pixels.shape[1:3])

    def discard_cached(self) -> bool:
        from dmt_jepa.serve.backends.choice import cache_dir
        from dmt_jepa.serve.calibration import drop_cached

        return self._calibration_key is not None and drop_cached(cache_dir(), self._calibration_key)

    def reference(self) -> Backend | None:
        if self.precision == "fp32":
            return None
        return OpenVinoBackend(self.onnx_path, precision="fp32", layers=self.layers)
