"""The one interface every inference backend offers, and the first-batch precision check."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dmt_jepa.encoder_file import EncoderInfo
from dmt_jepa.models import resolve_layers
from dmt_jepa.serve.images import normalise

# int8: dynamic on onnxruntime-cpu (activation ranges measured per batch), calibrated on openvino;
# int8-static: calibrated on onnxruntime-cpu (serve/calibration.py).
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int8-static")
MIN_PATCH_COSINE = 0.99


class BackendError(ValueError):
    """A model file, backend or precision that cannot be used; the message is one sentence for the user."""


class Backend(ABC):
    """Runs the deployed encoder: normalised images -> patch embeddings and their mean."""

    name: str  # torch-cpu, torch-cuda, onnxruntime-cpu, onnxruntime-cuda, openvino or tensorrt
    precision: str
    info: EncoderInfo
    model_path: Path
    model_sha256: str = ""  # dmt_jepa.encoder_file.model_identity of the model file: its tensors, not its bytes
    notices: tuple[str, ...] = ()  # one line each for the user (a precision that was changed, and why)
    layers: tuple[int, ...] = ()  # blocks output besides the grid, absolute indices

    @abstractmethod
    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """float32 [B, 3, H, W] -> float32 patch embeddings [B, H/p, W/p, D], pooled [B, D], then
        one [B, H/p, W/p, D] per entry of `layers` (after the final norm)."""

    def run_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
        """uint8 [B, H, W, 3] -> the same outputs as `run`, normalising with the model's pixel mean/std."""
        return self.run(normalise(pixels, self.info.pixel_mean, self.info.pixel_std))

    def reference(self) -> Backend | None:
        """The same model in fp32 for the precision check, or None where this backend has none."""
        return None

    def discard_cached(self) -> bool:
        """Delete the cached model this backend runs (a calibrated int8 one, serve/calibration.py) once it failed
        the first-batch check, so that the next run makes it again; True where one was deleted."""
        return False

    def check_size(self, size: tuple[int, int]) -> None:
        """Raise BackendError if this backend cannot run images of [H, W] = size."""
        patch = self.info.patch_size
        if size[0] % patch or size[1] % patch:
            raise BackendError(f"the input size {size[0]}x{size[1]} is not a multiple of the patch size {patch}.")

    def describe(self) -> dict:
        """What the output records say about the model that made them."""
        return {
            "backend": self.name,
            "precision": self.precision,
            "model": {"file": self.model_path.name, "sha256": self.model_sha256, "arch": self.info.arch},
        }


def backend_layers(info: EncoderInfo, layers: Sequence[int] | None) -> tuple[int, ...]:
    """Absolute block indices of a `--layers` choice, or BackendError saying the valid range."""
    if not layers:
        return ()
    try:
        return tuple(resolve_layers(info.depth, layers))
    except ValueError as err:
        raise BackendError(f"--layers: {err}") from err


def patch_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per patch of two [..., D] arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def checked_run(backend: Backend, pixels: np.ndarray) -> tuple[tuple[np.ndarray, ...], float | None]:
    """Run a uint8 batch and compare it with fp32; returns the outputs and the worst patch cosine (None: no check)."""
    outputs = backend.run_pixels(pixels)
    reference = backend.reference()
    if reference is None:
        return outputs, None
    worst = float(patch_cosine(outputs[0], reference.run_pixels(pixels)[0]).min())
    if worst < MIN_PATCH_COSINE:
        dropped = " (the cached calibrated model it ran was deleted: the next run calibrates again)"
        raise BackendError(
            f"{backend.precision} on {backend.name} is too far from fp32 on the first batch (worst patch cosine "
            f"{worst:.4f} < {MIN_PATCH_COSINE}){dropped if backend.discard_cached() else ''}; use --precision fp32 "
            "or another backend."
        )
    return outputs, worst
