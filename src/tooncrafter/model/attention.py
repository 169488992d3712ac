"""The one attention function every attention layer of the model calls.

Weights live in the modules (`to_q`, `to_k`, ...); the math lives here, as in diffusers'
processors. The default is PyTorch's `scaled_dot_product_attention` (flash / memory-efficient
kernels on GPU, no xformers). `math_attention` is the plain `softmax(q k^T s) v` the official code
computes; the benchmark baseline swaps it in with `set_attention_function`.

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


def set_attention_function(root: nn.Module, fn: Callable[..., torch.Tensor]) -> None:
    """Swap the attention math of every layer under `root` that has an `attention_fn` attribute."""
    for module in root.modules():
        if hasattr(module, "attention_fn"):
            module.attention_fn = fn
