"""ONNX -> TensorRT engine with an optimisation profile, verified against ONNX Runtime before it is kept."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from dmt_jepa.encoder_file import file_sha256
from dmt_jepa.export.errors import ExportError, ParityError
from dmt_jepa.export.io_names import IO_NAMES_METADATA, IoNames, detect
from dmt_jepa.export.onnx_export import onnx_runner
from dmt_jepa.export.profile import ShapeProfile
from dmt_jepa.export.verify import FP16_TOLERANCE, ParityReport, check_parity

ENGINE_FILENAME = "encoder.engine"
SIDECAR_FORMAT = "dmt-jepa-tensorrt-engine"
SIDECAR_VERSION = 1


@dataclass(frozen=True)
class PrecisionPlan:
    """How fp16 is asked of this TensorRT: which ONNX it parses and how the network is typed."""

    api: str  # "builder-flag-fp16" (TensorRT 10) or "strongly-typed" (TensorRT 11+)
    onnx_precision: str  # the ONNX file the network is parsed from: "fp32" or "fp16"

    @property
    def strongly_typed(self) -> bool:
        return self.api == "strongly-typed"


def precision_plan(version: str) -> PrecisionPlan:
    """TensorRT 10 takes fp16 as a builder flag; 11 removed that flag, so fp16 comes typed in the ONNX."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError as err:
        raise ExportError(f"cannot read the TensorRT version {version!r}; reinstall TensorRT 10 or newer.") from err
    if major < 10:
        raise ExportError(f"TensorRT {version} is too old; install TensorRT 10 or newer (pip install 'tensorrt>=10').")
    if major == 10:
        return PrecisionPlan(api="builder-flag-fp16", onnx_precision="fp32")
    return PrecisionPlan(api="strongly-typed", onnx_precision="fp16")


def require_tensorrt() -> ModuleType:
    """The tensorrt module, or a one-sentence error saying how to get it."""
    try:
        import tensorrt
    except ImportError as err:
        raise ExportError(
            "TensorRT is not installed; install it on a machine with an NVIDIA GPU "
            "(pip install 'dmt-jepa[tensorrt]') or export ONNX only (drop --trt)."
        ) from err
    return tensorrt


def require_gpu() -> str:
    """The CUDA device's name, or a one-sentence error: engines are built on the GPU that runs them."""
    import torch

    if not torch.cuda.is_available():
        raise ExportError("no CUDA GPU is visible; build the TensorRT engine on the machine (and GPU model) that will run it.")
    return torch.cuda.get_device_name(0)


def network_flags(trt: Any, plan: PrecisionPlan) -> int:
    """Creation flags for builder.create_network (TensorRT 11 is always strongly typed; the flag is harmless)."""
    if plan.strongly_typed:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def apply_precision(trt: Any, network: Any, config: Any, plan: PrecisionPlan) -> None:
    """Ask for fp16 the way this TensorRT understands, keeping LayerNorm in fp32 either way."""
    if plan.strongly_typed:
        return  # precisions come from the fp16 ONNX, whose LayerNorms are already fp32
    config.set_flag(trt.BuilderFlag.FP16)
    # With the fp16 flag TensorRT may otherwise run normalisation in fp16, where the variance overflows.
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.precision = trt.float32
            layer.set_output_type(0, trt.float32)


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """The JSON that describes an engine: `encoder.engine` -> `encoder.engine.json`."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def timing_cache_path(engine_path: str | os.PathLike) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.stem + ".timing.cache")


def engine_sidecar(
    *,
    engine_name: str,
    engine_sha256: str,
    onnx_name: str,
    onnx_sha256: str,
    onnx_metadata: dict[str, str],
    profile: ShapeProfile,
    plan: PrecisionPlan,
    tensorrt_version: str,
    gpu_name: str,
    report: ParityReport,
    names: IoNames,
) -> dict:
    """What an engine says about itself: profile, precision, TensorRT, GPU, sources, parity, encoder."""
    encoder = {k: v for k, v in onnx_metadata.items() if k not in ("precision", "opset", "source_sha256", IO_NAMES_METADATA)}
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "engine": engine_name,
        "engine_sha256": engine_sha256,
        "precision": "fp16",
        "tensorrt_version": tensorrt_version,
        "tensorrt_api": plan.api,
        "gpu": gpu_name,
        "input": names.input,
        "outputs": names.outputs(),
        "io_names": names.style,
        "profile": profile.to_json(),
        "source_sha256": onnx_metadata.get("source_sha256", ""),
        "onnx": onnx_name,
        "onnx_sha256": onnx_sha256,
        "parity": report.to_json(),
        "encoder": encoder,
    }


def read_sidecar(path: str | os.PathLike) -> dict:
    """Load an engine sidecar, given the engine or the sidecar itself."""
    path = Path(path)
    if path.suffix != ".json":
        path = sidecar_path(path)
    if not path.is_file():
        raise ExportError(f"engine sidecar {path} does not exist; rebuild the engine with dmtjepa export --trt.")
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path} is not a readable engine sidecar ({err}); rebuild the engine.") from err
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise ExportError(f"{path} is not a dmt-jepa engine sidecar (no '{SIDECAR_FORMAT}' format).")
    return sidecar


class TensorRTRunner:
    """A deserialised engine as a numpy function on the current CUDA device."""

    def __init__(self, trt: Any, engine_bytes: bytes, names: IoNames):
        import torch

        self._torch, self._names = torch, names
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise ExportError("TensorRT could not load the engine it just built; check the TensorRT log above.")
        self.context = self.engine.create_execution_context()
        self._dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self._stream = torch.cuda.Stream()

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(images)).cuda()
        self.context.set_input_shape(self._names.input, tuple(x.shape))
        self.context.set_tensor_address(self._names.input, x.data_ptr())
        outputs = {}
        for name in self._names.outputs():
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._dtypes[self.engine.get_tensor_dtype(name)], device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self._stream.wait_stream(torch.cuda.current_stream())  # the input copy happened there
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise ExportError("TensorRT failed to run the engine; check the TensorRT log above.")
        self._stream.synchronize()
        return tuple(outputs[name].float().cpu().numpy() for name in self._names.outputs())


def _reference_providers() -> list:
    """ONNX Runtime on the GPU when it can (large profile shapes are slow on CPU), in true fp32 (no TF32)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def build_engine(
    onnx_path: str | os.PathLike,
    reference_onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    profile: ShapeProfile,
    plan: PrecisionPlan,
    *,
    trt: ModuleType,
    gpu_name: str,
    log: Callable[[str], None] = print,
) -> tuple[Path, dict]:
    """Build `out_dir/encoder.engine` from `onnx_path`; keep it only if it matches ONNX Runtime on the fp32 model."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    engine_path = out_dir / ENGINE_FILENAME
    model = onnx.load(str(onnx_path), load_external_data=False)
    names = detect([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    if names is None:
        raise ExportError(f"{onnx_path.name} has neither the default nor the legacy input/output names; export it again.")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name} ({errors}); try another TensorRT version or opset.")

    config = builder.create_builder_config()
    apply_precision(trt, network, config, plan)
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(names.input, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(trt_profile)

    cache_path = timing_cache_path(engine_path)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"ignoring {cache_path.name}: it was made by another GPU or TensorRT version")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    log(f"building the TensorRT {trt.__version__} engine ({plan.api}, profile {profile.to_json()}); this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine; check the TensorRT log above (often: GPU memory).")
    engine_bytes = bytes(serialized)
    _atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))

    report = check_parity(
        TensorRTRunner(trt, engine_bytes, names),
        onnx_runner(reference_onnx_path, providers=_reference_providers(), names=names),
        profile.shapes(),
        FP16_TOLERANCE,
        candidate_name=f"TensorRT {trt.__version__} fp16",
        reference_name="ONNX Runtime fp32",
    )
    for line in report.lines():
        log(line)
    if not report.ok:
        raise ParityError(
            "the TensorRT engine differs from ONNX Runtime beyond tolerance and was not kept (figures above); "
            "try --opt-shape/--max-shape closer to your inputs or another TensorRT version.",
            report.lines(),
        )

    metadata = {p.key: p.value for p in model.metadata_props}
    sidecar = engine_sidecar(
        engine_name=engine_path.name,
        engine_sha256=hashlib.sha256(engine_bytes).hexdigest(),
        onnx_name=onnx_path.name,
        onnx_sha256=file_sha256(onnx_path),
        onnx_metadata=metadata,
        profile=profile,
        plan=plan,
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        report=report,
        names=names,
    )
    _atomic_write(engine_path, engine_bytes)
    _atomic_write(sidecar_path(engine_path), (json.dumps(sidecar, indent=2) + "\n").encode())
    log(f"wrote {engine_path} and {sidecar_path(engine_path).name}")
    return engine_path, sidecar


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
