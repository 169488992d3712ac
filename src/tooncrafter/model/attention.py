"""The one attention function every attention layer of the model calls.

Weights live in the modules (`to_q`, `to_k`, ...); the math lives here, as in diffusers'
processors. The default is PyTorch's `scaled_dot_product_attention` (flash / memory-efficient
kernels on GPU, no xformers); a CPU pipeline swaps in `cpu_attention`, faster there.
`math_attention` is the plain `softmax(q k^T s) v` the official code computes; the benchmark
baseline swaps it in with `set_attention_function`.

Shapes: q `[B, Lq, heads*d]`, k and v `[B, Lk, heads*d]`, result `[B, Lq, heads*d]`.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class AttentionFunction(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor: ...


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # [B, heads, L, d]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
    """Multi-head attention on `F.scaled_dot_product_attention` (scale defaults to d^-0.5)."""
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads), scale=scale)
    return _merge_heads(out)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
    """The official formulation: materialise the logits, softmax, multiply. Reference and baseline only."""
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    weights = (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)
    return _merge_heads(weights @ v)


# Bytes of attention logits one CPU product may hold: bounds `cpu_attention`'s memory at any size (the full
# 320x512 UNet's spatial logits would be 2 GB in one piece) while keeping its products large.
CPU_LOGITS_BUDGET_BYTES = 32 << 20
# Keys per query up to which the materialised form beats the fused SDPA kernel on CPU in fp32.
CPU_FP32_MATH_MAX_KEYS = 64


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
    """Attention for CPU inference: the materialised `softmax(q k^T s) v` as batched products, in pieces of at
    most `CPU_LOGITS_BUDGET_BYTES` of logits, where that is faster than PyTorch's fused CPU kernel; SDPA elsewhere.

    Measured on Zen 5 (2 threads, median of 5): in bf16 the products run on oneDNN's bf16 GEMMs and take half
    the fused kernel's time at every shape of the mid UNet and VAE (`[32, 5, 256, 64]` self-attention 25.1 ->
    11.9 ms, `[512, 5, 16, 64]` temporal 8.8 -> 3.9 ms, VAE `[1, 8, 1024, 64]` x 2048 keys 26.6 -> 11.5 ms, the
    full-size `[32, 5, 2560, 64]` 1.65 -> 0.96 s); in fp32 only with few keys (16 keys 10.7 -> 6.0 ms; 256 keys
    21.5 -> 29.3 ms). The logits round to the input dtype before the softmax, as in the official math; the
    softmax's own output rounds to it once.
    """
    if q.device.type != "cpu" or (q.dtype == torch.float32 and k.shape[1] > CPU_FP32_MATH_MAX_KEYS):
        return sdpa_attention(q, k, v, heads, scale)
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q3, k3, v3 = q.reshape(b * h, lq, d), k.reshape(b * h, lk, d), v.reshape(b * h, lk, v.shape[-1])
    out = torch.empty(b * h, lq, v.shape[-1], dtype=q.dtype)
    per_piece = max(1, CPU_LOGITS_BUDGET_BYTES // (lq * lk * q.element_size()))
    no_input = q.new_zeros(())  # baddbmm with beta 0 reads nothing from it
    for start in range(0, b * h, per_piece):
        end = min(start + per_piece, b * h)
        # the scale as the product's alpha: no extra pass over the logits
        logits = torch.baddbmm(no_input, q3[start:end], k3[start:end].transpose(1, 2), beta=0, alpha=scale)
        torch.bmm(_softmax_last(logits), v3[start:end], out=out[start:end])
    return _merge_heads(out.view(b, h, lq, -1))


def _softmax_last(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis in the logits' dtype. PyTorch's bf16/fp16 CPU kernel is slow on rows whose length
    is not a multiple of its 32-lane vector (2 threads, Zen 5, 650k rows of 16: 20.1 ms; 77 keys 12.8 ms per
    170k rows): there the fp32 kernel plus a cast back is faster (11.6 / 9.5 ms), elsewhere slower (64 keys 5.3
    vs 8.7 ms; fp16 alike: 16 keys 33.1 -> 8.6, 64 keys 3.5 vs 7.6 ms), so only short odd rows (the UNet's 16
    temporal and image tokens, 77 text tokens) take it."""
    keys = logits.shape[-1]
    if logits.dtype in (torch.bfloat16, torch.float16) and keys % 32 and 8 < keys < 96:
        return logits.softmax(dim=-1, dtype=torch.float32).to(logits.dtype)
    return logits.softmax(dim=-1)


def set_attention_function(root: nn.Module, fn: Callable[..., torch.Tensor]) -> None:
    """Swap the attention math of every layer under `root` that has an `attention_fn` attribute."""
    for module in root.modules():
        if hasattr(module, "attention_fn"):
            module.attention_fn = fn
