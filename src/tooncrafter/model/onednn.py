"""What oneDNN (PyTorch's mkldnn backend) can run on this CPU, asked once by every CPU fast path."""

from __future__ import annotations

import functools
import platform

import torch


@functools.cache  # asked per call by the GEMM form: what the CPU and the build offer does not change
def prepack_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN can pack and run convolutions of `dtype` on this CPU.

    Its bf16/fp16 kernels need AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT: on an AVX2-only CPU (AMD Zen 3, for one)
    the weight reorder raises, so those convolutions stay with PyTorch's own kernels there.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return dtype == torch.float32


@functools.cache
def linear_prepack_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether matrix products of `dtype` run on oneDNN's `_linear_pointwise` here (packed weight or plain):
    fp32, and bf16 where oneDNN has bf16 kernels (`prepack_available`; a bf16 weight raises on an AVX2-only
    CPU). Otherwise fp32 runs MKL's sgemm -- 2-2.3x slower than oneDNN on AMD EPYC (Zen 3 and Zen 5), where MKL
    takes its generic path -- and bf16 reorders its weight inside every call: on Zen 5 packing took a bf16
    `[8192, 320] x 2560` from 19.9 to 14.7 ms and the other UNet shapes 5-13 % (benchmarks/README.md)."""
    return dtype in (torch.float32, torch.bfloat16) and prepack_available(dtype) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU computes in bf16 itself (AVX512-BF16 or AMX on x86), not only converts to and from it.

    oneDNN also runs bf16 on a plain AVX-512 CPU (Intel Ice Lake, for one) by converting to fp32 in its kernels:
    there one `mid` request (3 steps) took 201 s in bf16 against 67 s in fp32 (benchmarks/README.md). Other
    architectures: oneDNN's own answer, which there already means hardware bf16.
    """
    if not prepack_available(torch.bfloat16):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def slow_cpu_dtype_reason(dtype: torch.dtype) -> str | None:
    """Why `dtype` would run many times slower than float32 on this CPU, or None when it would not."""
    if dtype == torch.float32:
        return None
    if not prepack_available(dtype):
        # measured on an AVX2-only AMD EPYC: one mid UNet call 16 s in fp32, not done after 400 s in bf16
        return f"this CPU has no oneDNN {dtype} kernels (they need AVX-512 or AMX): PyTorch's reference kernels are"
    if dtype == torch.bfloat16 and not native_bfloat16():
        return "this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): oneDNN converts every bf16 operand to fp32 and"
    return None
