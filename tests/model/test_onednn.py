"""What the CPU fast paths are told about this CPU, and which dtypes the load warns about."""

from __future__ import annotations

import pytest
import torch

from tooncrafter.model import onednn


def _cpu(monkeypatch, *, machine: str, kernels: bool, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(onednn, "prepack_available", lambda dtype=torch.float32: dtype == torch.float32 or kernels)
    monkeypatch.setattr(onednn.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(
    ("machine", "kernels", "avx512_bf16", "amx", "native"),
    [
        ("x86_64", True, False, False, False),  # Ice Lake: oneDNN emulates bf16
        ("x86_64", True, True, False, True),  # Zen 4/5: AVX512-BF16
        ("x86_64", True, False, True, True),  # Sapphire Rapids: AMX
        ("x86_64", False, False, False, False),  # AVX2 only: no bf16 kernels at all
        ("aarch64", True, False, False, True),  # Arm: oneDNN offers bf16 only on bf16 hardware
    ],
)
def test_native_bfloat16_needs_bf16_arithmetic_not_only_kernels(monkeypatch, machine, kernels, avx512_bf16, amx, native):
    _cpu(monkeypatch, machine=machine, kernels=kernels, avx512_bf16=avx512_bf16, amx=amx)
    assert onednn.native_bfloat16.__wrapped__() is native


def test_the_slow_dtype_reason_names_what_the_cpu_lacks(monkeypatch):
    _cpu(monkeypatch, machine="x86_64", kernels=True, avx512_bf16=False, amx=False)
    monkeypatch.setattr(onednn, "native_bfloat16", onednn.native_bfloat16.__wrapped__)
    assert onednn.slow_cpu_dtype_reason(torch.float32) is None
    assert "AVX512-BF16 or AMX" in onednn.slow_cpu_dtype_reason(torch.bfloat16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert onednn.slow_cpu_dtype_reason(torch.bfloat16) is None
    monkeypatch.setattr(onednn, "prepack_available", lambda dtype=torch.float32: dtype == torch.float32)
    assert "no oneDNN torch.bfloat16 kernels" in onednn.slow_cpu_dtype_reason(torch.bfloat16)
    assert "no oneDNN torch.float16 kernels" in onednn.slow_cpu_dtype_reason(torch.float16)
