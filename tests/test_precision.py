"""bf16 only where the hardware computes it: the decision, with the capability given rather than probed."""

import pytest
import torch
from embed_helpers import write_encoder_file

from dmt_jepa.objective import autocast_dtype_for
from dmt_jepa.precision import CPU_BF16_NOTICE, cpu_has_bf16, effective_precision
from dmt_jepa.serve.backends.torch_backend import TorchBackend


@pytest.mark.parametrize(
    "requested, device, has_bf16, expected",
    [
        ("bf16", "cpu", True, ("bf16", None)),
        ("bf16", "cpu", False, ("fp32", CPU_BF16_NOTICE)),
        ("fp32", "cpu", False, ("fp32", None)),
        ("auto", "cpu", True, ("fp32", None)),  # bf16 on CPU is never faster enough to be chosen unasked
        ("auto", "cpu", False, ("fp32", None)),
        ("auto", "cuda", True, ("bf16", None)),
        ("auto", "cuda", False, ("fp32", None)),
        ("fp16", "cuda", False, ("fp16", None)),
    ],
)
def test_precision_follows_the_capability(requested, device, has_bf16, expected):
    assert effective_precision(requested, device, has_bf16) == expected


def test_torch_cpu_backend_runs_fp32_with_a_notice_where_bf16_is_missing(tmp_path):
    path = write_encoder_file(tmp_path / "enc.safetensors")
    without = TorchBackend.from_file(path, device="cpu", precision="bf16", has_bf16=False)
    assert without.precision == "fp32" and without.notices == (CPU_BF16_NOTICE,) and without.reference() is None
    with_bf16 = TorchBackend.from_file(path, device="cpu", precision="bf16", has_bf16=True)
    assert with_bf16.precision == "bf16" and with_bf16.notices == ()
    assert autocast_dtype_for("cpu", "bf16", has_bf16=False) is None
    assert autocast_dtype_for("cpu", "bf16", has_bf16=True) is torch.bfloat16


def test_the_probe_agrees_with_the_kernels_cpu_flags():
    flags = open("/proc/cpuinfo").read()
    expected = any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16")) or "\nFeatures" in flags and " bf16" in flags
    assert cpu_has_bf16() == expected
