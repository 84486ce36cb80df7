"""The machine line every benchmark prints beside its figures: CPU model, cores and the bf16/int8 flags."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmt_jepa.serve.backends.cpu import cpu_info


def cpu_description() -> dict:
    """CPU model, cores, avx512_bf16 / amx / vnni, and the library versions that set the figures."""
    import onnxruntime

    return {
        **cpu_info().to_dict(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
    }
