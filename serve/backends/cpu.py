"""What the CPU offers for inference: its model name and the instruction sets that change which path is fastest.

bf16 pays only where the CPU multiplies in bf16 (AVX512-BF16 or AMX); int8 gains most with VNNI.
Benchmarks print these beside every figure, and `auto` caches its choice per CPU model.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU model and the flags that matter for bf16 and int8 inference."""

    model: str
    cores: int
    avx512_bf16: bool
    amx: bool  # AMX tiles with bf16 (amx_bf16)
    vnni: bool  # avx512_vnni or avx_vnni: int8 dot products

    @property
    def bf16(self) -> bool:
        """Whether the CPU computes in bf16 natively (otherwise bf16 is emulated and slower than fp32)."""
        return self.avx512_bf16 or self.amx

    def to_dict(self) -> dict:
        return {**asdict(self), "bf16": self.bf16}


def parse_cpuinfo(text: str, cores: int) -> CpuInfo:
    """A CpuInfo from the text of /proc/cpuinfo (the first processor's model name and flags)."""
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return CpuInfo(
        model=model or platform.processor() or platform.machine(),
        cores=cores,
        avx512_bf16="avx512_bf16" in flags,
        amx="amx_bf16" in flags,
        vnni=bool({"avx512_vnni", "avx_vnni"} & flags),
    )


def cpu_info() -> CpuInfo:
    """This machine's CPU (flags read from /proc/cpuinfo; all False where it does not exist)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        text = CPUINFO.read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text, cores)
