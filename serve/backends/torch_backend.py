"""PyTorch backend: runs the encoder file itself, on CPU (fp32, bf16) or CUDA (fp32, bf16, fp16)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dmt_jepa.encoder_file import EncoderInfo, load_encoder
from dmt_jepa.models import VisionTransformer
from dmt_jepa.precision import device_has_bf16, effective_precision
from dmt_jepa.serve.backends.base import Backend, BackendError, backend_layers

PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _check(device: str, precision: str) -> None:
    if precision not in PRECISIONS[device]:
        raise BackendError(
            f"PyTorch on {device} runs {', '.join(PRECISIONS[device])}, not {precision}; pick one of those, "
            "or export to ONNX (dmtjepa export) and use onnxruntime-cpu for int8."
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError("--backend torch-cuda needs a CUDA GPU and none is visible; use torch-cpu.")


def normalise_on_device(pixels: np.ndarray, info: EncoderInfo, device: str) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] on `device`; the uint8 copy is a quarter of the bytes."""
    x = torch.from_numpy(pixels).to(device, non_blocking=True).permute(0, 3, 1, 2)  # uint8 [B, 3, H, W]
    mean = torch.tensor(info.pixel_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(info.pixel_std, device=device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


class TorchBackend(Backend):
    """The encoder in eval mode; bf16/fp16 through autocast, so LayerNorm and softmax stay in fp32."""

    def __init__(
        self,
        encoder: VisionTransformer,
        info: EncoderInfo,
        *,
        device: str,
        precision: str,
        model_path: Path,
        layers: Sequence[int] | None = None,
    ):
        _check(device, precision)
        self.layers = backend_layers(info, layers)
        self.encoder = encoder.to(device).eval()
        self.info, self.device, self.precision, self.model_path = info, device, precision, model_path
        self.name = f"torch-{device}"

    @classmethod
    def from_file(
        cls,
        path: Path,
        *,
        device: str,
        precision: str,
        has_bf16: bool | None = None,
        layers: Sequence[int] | None = None,
    ) -> TorchBackend:
        """`has_bf16`: whether the device computes bf16 natively (None: ask it); without, bf16 runs as fp32."""
        _check(device, precision)
        has_bf16 = device_has_bf16(device) if has_bf16 is None else has_bf16
        precision, notice = effective_precision(precision, device, has_bf16)
        encoder, info = load_encoder(path, device)
        backend = cls(encoder, info, device=device, precision=precision, model_path=path, layers=layers)
        backend.notices = (notice,) if notice else ()
        return backend

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=AUTOCAST_DTYPES[self.precision])

    def _dense(self, x: torch.Tensor) -> tuple[np.ndarray, ...]:
        with torch.inference_mode(), self._autocast():
            grid, pooled, maps = self.encoder.dense_with_layers(x, self.layers)  # [B, h, w, D], [B, D], ...
        return tuple(out.float().cpu().numpy() for out in (grid, pooled, *maps))

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        return self._dense(torch.from_numpy(images).to(self.device, non_blocking=True))  # [B, 3, H, W]

    def run_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
        return self._dense(normalise_on_device(pixels, self.info, self.device))

    def reference(self) -> Backend | None:
        if self.precision == "fp32":
            return None
        return TorchBackend(
            self.encoder, self.info, device=self.device, precision="fp32", model_path=self.model_path, layers=self.layers
        )
