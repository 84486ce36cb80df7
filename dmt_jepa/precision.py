"""Which precision runs fast where: bf16 only on hardware with bf16 arithmetic, otherwise fp32.

On a CPU without bf16 instructions PyTorch emulates bf16 and runs slower than fp32 (measured on an
Intel Xeon without AVX512-BF16: a training step 12.0 s against 3.5 s, embedding 5.3 against 15.4
images/s). So bf16 asked for on such a CPU runs in fp32 with a one-line notice, and `auto` never
picks bf16 where it is slower. The capability is a parameter everywhere, so the decision is tested
without depending on the machine the tests run on.
"""

from __future__ import annotations

import re
from pathlib import Path

CPU_BF16_NOTICE = (
    "bf16 was asked for, but this CPU has no bf16 instructions (AVX512-BF16, AMX or Arm BF16), where bf16 "
    "runs slower than fp32; running in fp32."
)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively: x86 AVX512-BF16 or AMX-BF16, Arm BF16."""
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        supported = getattr(torch.cpu, probe, None)
        if supported is not None and supported():
            return True
    try:  # Arm, or a torch without the probes: the flags the kernel reports
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^(?:flags|Features)\s*:.*\b(?:avx512_bf16|amx_bf16|bf16)\b", cpuinfo, re.MULTILINE) is not None


def cuda_has_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def effective_precision(requested: str, device: str, has_bf16: bool) -> tuple[str, str | None]:
    """(precision to run, notice for the user or None) for `requested` (auto, bf16, fp16, fp32, ...) on `device`.

    `auto`: bf16 on CUDA where the GPU has it, else fp32. `bf16` on a device without it: fp32 with a
    notice. Anything else is returned unchanged.
    """
    if requested == "auto":
        return ("bf16" if device == "cuda" and has_bf16 else "fp32"), None
    if requested == "bf16" and not has_bf16:
        return "fp32", CPU_BF16_NOTICE if device == "cpu" else "this GPU has no bf16 support; running in fp32."
    return requested, None


def device_has_bf16(device: str) -> bool:
    """Whether `device` (cpu or cuda) computes in bf16 natively."""
    return cuda_has_bf16() if device == "cuda" else cpu_has_bf16()
