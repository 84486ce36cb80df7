"""Inference backends behind one interface; `load_backend` picks and builds one for a model file."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from dmt_jepa.encoder_file import EncoderFileError, model_identity
from dmt_jepa.serve.backends.base import PRECISIONS, Backend, BackendError, checked_run, patch_cosine

BACKENDS = ("auto", "torch-cpu", "torch-cuda", "onnxruntime-cpu", "onnxruntime-cuda", "openvino", "tensorrt")
MODEL_KINDS = {".safetensors": "encoder", ".onnx": "onnx", ".engine": "engine", ".plan": "engine"}
KIND_BACKENDS = {
    "encoder": ("torch-cpu", "torch-cuda", "openvino"),
    "onnx": ("onnxruntime-cpu", "onnxruntime-cuda", "openvino"),
    "engine": ("tensorrt",),
}
KIND_WORDS = {"encoder": "an encoder file", "onnx": "an ONNX model", "engine": "a TensorRT engine"}

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Backend",
    "BackendError",
    "checked_run",
    "load_backend",
    "model_kind",
    "patch_cosine",
]


def model_kind(path: Path) -> str:
    """encoder, onnx or engine, from the file's suffix; BackendError for anything else."""
    if path.is_dir():
        raise BackendError(
            f"{path} is a directory; --model takes a model file: an encoder file (.safetensors), an ONNX model (.onnx) "
            "or a TensorRT engine (.engine)."
        )
    if not path.is_file():
        raise BackendError(f"the model file {path} does not exist.")
    kind = MODEL_KINDS.get(path.suffix.lower())
    if kind is None:
        raise BackendError(
            f"{path} is neither an encoder file (.safetensors), an ONNX model (.onnx) nor a TensorRT engine "
            "(.engine); pass one of those with --model."
        )
    return kind


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_backend(kind: str) -> str:
    """The fastest backend for a model kind on this machine: engine > ORT CUDA > PyTorch CUDA > CPU."""
    if kind == "engine":
        return "tensorrt"
    cuda = _cuda_available()
    if kind == "onnx":
        import onnxruntime as ort

        return "onnxruntime-cuda" if cuda and "CUDAExecutionProvider" in ort.get_available_providers() else "onnxruntime-cpu"
    return "torch-cuda" if cuda else "torch-cpu"


def local_gpu(env: Mapping[str, str] = os.environ) -> int:
    """The GPU this process should use: its rank on the node (torchrun LOCAL_RANK, SLURM_LOCALID), else 0."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def _select_gpu() -> None:
    """Make this process's GPU the current one, so that several processes on one node do not share GPU 0."""
    import torch

    torch.cuda.set_device(local_gpu() % torch.cuda.device_count())


# The CPU backends `auto` may measure against each other, with the precisions each runs.
CPU_CHOICES = {
    "torch-cpu": ("fp32", "bf16"),
    "onnxruntime-cpu": ("fp32", "int8", "int8-static"),
    "openvino": ("fp32", "bf16", "int8"),
}


def _openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _build(name: str, kind: str, path: Path, precision: str | None, layers: Sequence[int] | None) -> Backend:
    """Build backend `name` for a model file of `kind`; EncoderFileError becomes BackendError."""
    try:
        if name == "openvino":
            from dmt_jepa.serve.backends.openvino_backend import OpenVinoBackend

            return OpenVinoBackend(path, precision=precision, layers=layers)
        if kind == "encoder":
            from dmt_jepa.serve.backends.torch_backend import TorchBackend

            return TorchBackend.from_file(path, device=name.split("-")[1], precision=precision or "fp32", layers=layers)
        if kind == "onnx":
            from dmt_jepa.serve.backends.onnx_backend import OnnxRuntimeBackend

            return OnnxRuntimeBackend(path, device=name.split("-")[1], precision=precision, layers=layers)
        from dmt_jepa.serve.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path, precision=precision)
    except EncoderFileError as err:
        raise BackendError(str(err)) from err


def _measured_cpu_choice(
    path: Path, kind: str, precision: str | None, layers: Sequence[int] | None
) -> tuple[str, Backend | None]:
    """For an fp32 ONNX model: the faster of ONNX Runtime and OpenVINO here (serve/backends/choice.py).

    Only ONNX models are measured: both backends then run the same verified graph. An encoder file
    stays with PyTorch under `auto` (OpenVINO would first have to export it on every load).
    """
    from dmt_jepa.serve.backends.choice import measured_choice
    from dmt_jepa.serve.backends.onnx_backend import read_contract

    wanted = precision or "fp32"
    names = [n for n in KIND_BACKENDS[kind] if n in CPU_CHOICES and wanted in CPU_CHOICES[n]]
    if kind != "onnx" or "openvino" not in names or len(names) < 2 or not _openvino_available():
        return choose_backend(kind), None
    info, _, _, stored = read_contract(path, path)
    if stored != "fp32":
        return choose_backend(kind), None  # OpenVINO takes fp32 exports only: nothing to compare
    builders = {n: (lambda n=n: _build(n, kind, path, precision, layers)) for n in names}
    return measured_choice(kind, info, wanted, builders)


def load_backend(
    model: str | os.PathLike, backend: str = "auto", precision: str | None = None, layers: Sequence[int] | None = None
) -> Backend:
    """Build the backend for a model file; `precision` None means the model's own (fp32 unless built otherwise).

    `auto` on a machine without CUDA runs an fp32 ONNX model on the faster of ONNX Runtime and
    OpenVINO, measured once per CPU model and model (serve/backends/choice.py says where it is cached).

    `layers` (block indices) makes `run` return those blocks too; an ONNX model must have been exported with them.
    """
    path = Path(model)
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if precision is not None and precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    kind = model_kind(path)
    name = choose_backend(kind) if backend == "auto" else backend
    if name not in KIND_BACKENDS[kind]:
        raise BackendError(
            f"--backend {name} cannot run {KIND_WORDS[kind]} ({path.name}); it runs "
            f"{KIND_WORDS[next(k for k, names in KIND_BACKENDS.items() if name in names)]}. "
            "Use `dmtjepa export` to convert, or --backend auto."
        )
    if layers and kind == "engine":
        raise BackendError("TensorRT engines output the grid and pooled vector only; use the ONNX model for --layers.")
    if name not in ("torch-cpu", "onnxruntime-cpu", "openvino") and _cuda_available():
        _select_gpu()
    built: Backend | None = None
    if backend == "auto" and name in CPU_CHOICES:
        name, built = _measured_cpu_choice(path, kind, precision, layers)
    if built is None:
        built = _build(name, kind, path, precision, layers)
    built.model_sha256 = model_identity(path)
    return built
