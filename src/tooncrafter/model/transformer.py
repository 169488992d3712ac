"""Spatial and temporal transformers of the 3D UNet.

Notation:
    x     tokens `[N, L, C]` (N = frames x batch for spatial layers, pixels x batch for temporal ones)
    c_txt the text context, the first `text_context_len` (77) tokens of the context
    c_img the image context (Resampler tokens of this frame), the tokens after the text
    s     the softmax scale d^-0.5, d = head width

Spatial cross-attention adds two attentions that share the query (the paper's dual cross-attention):
    out = to_out( softmax(q k^T s) v + 1.0 * softmax(q k_ip^T s) v_ip ),
    k, v = to_k / to_v (c_txt),  k_ip, v_ip = to_k_ip / to_v_ip (c_img).
Temporal transformers attend over the T frames of each pixel; both of their attentions are
self-attention (no context, no mask, no relative position), as in the official model.

Weights live in the modules; the math goes through `self.attention_fn` (model/attention.py), so
`set_attention_function` can swap SDPA for the plain formulation. LayerNorm and GroupNorm
statistics are computed in fp32 and cast back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tooncrafter.model.attention import AttentionFunction, sdpa_attention
from tooncrafter.model.norms import GroupNorm32, LayerNorm32

# The official CrossAttention splits the context after a fixed 77 tokens (the CLIP text length).
TEXT_CONTEXT_LENGTH = 77


class FrameContext(NamedTuple):
    """The cross-attention context of B videos of T frames, without a copy of the text per frame.

    text: `[B, L_txt, C_ctx]`, shared by the T frames of each video (the official code repeats it per frame,
    so every cross-attention projected the same 77 tokens T times: ~7 % of a mid UNet call's FLOPs).
    image: `[(B T), L_img, C_ctx]` (this frame's tokens) or `[B, L_img, C_ctx]` (shared by the frames).
    Keys and values of a shared part are projected once per video; its queries attend as one sequence of
    T x L_q tokens, which is the same math: every query row attends to the same keys.
    """

    text: torch.Tensor
    image: torch.Tensor


def _attend_shared(
    fn: AttentionFunction, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """`fn(q, k, v)` where k/v may hold one row per video while q holds one per frame: `[(B T), Lq, C]`."""
    if k.shape[0] == q.shape[0]:
        return fn(q, k, v, heads, scale)
    n, length, channels = q.shape
    out = fn(q.reshape(k.shape[0], (n // k.shape[0]) * length, channels), k, v, heads, scale)
    return out.reshape(n, length, channels)


class GEGLU(nn.Module):
    """`a * gelu(g)` with `a, g = proj(x).chunk(2)` (exact-erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, `dim -> mult*dim -> dim`. `net`: 0 GEGLU, 1 Dropout, 2 Linear."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head (cross-)attention; with `image_cross_attention` also the image branch (`to_k_ip`/`to_v_ip`).

    `context=None` means self-attention. With a context, keys/values come from its first
    `text_context_len` tokens, and (image branch) from the remaining tokens through the `_ip` weights.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        *,
        image_cross_attention: bool = False,
        image_cross_attention_scale: float = 1.0,
        text_context_len: int = TEXT_CONTEXT_LENGTH,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.scale = head_dim**-0.5
        self.text_context_len = text_context_len
        self.image_cross_attention = image_cross_attention
        self.image_cross_attention_scale = image_cross_attention_scale
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # to_out: 0 Linear, 1 Dropout
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        if image_cross_attention:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        self.attention_fn = sdpa_attention

    def forward(self, x: torch.Tensor, context: torch.Tensor | FrameContext | None = None) -> torch.Tensor:
        """x: `[N, Lq, C]`, context: `[N, L, C_ctx]`, a `FrameContext` (already split) or None -> `[N, Lq, C]`."""
        q = self.to_q(x)
        if context is None:
            out = self.attention_fn(q, self.to_k(x), self.to_v(x), self.heads, self.scale)
            return self.to_out(out)
        if not isinstance(context, FrameContext):
            # contiguous slices: one GEMM each instead of a batched matmul over per-row weight copies
            context = FrameContext(context[:, : self.text_context_len].contiguous(), context[:, self.text_context_len :])
        text, image = context
        out = _attend_shared(self.attention_fn, q, self.to_k(text), self.to_v(text), self.heads, self.scale)
        # An empty image context contributes nothing (the official einsum over zero keys gives 0).
        if self.image_cross_attention and image.shape[1] > 0:
            image = image.contiguous()
            out_ip = _attend_shared(self.attention_fn, q, self.to_k_ip(image), self.to_v_ip(image), self.heads, self.scale)
            out = out + self.image_cross_attention_scale * out_ip
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """`x += attn1(LN1 x)`; `x += attn2(LN2 x, context)`; `x += FF(LN3 x)`.

    attn1 is always self-attention; attn2 is cross-attention when `context_dim` is given, else a
    second self-attention (the temporal transformers).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        *,
        image_cross_attention: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, image_cross_attention=image_cross_attention, dropout=dropout)
        self.norm1 = LayerNorm32(dim)
        self.norm2 = LayerNorm32(dim)
        self.norm3 = LayerNorm32(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | FrameContext | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


def _pointwise(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a Linear, or a kernel-1 Conv1d/Conv2d (the non-`use_linear` checkpoints), over the last dim.

    The tokens are made contiguous first: on a strided 3-D input `F.linear` cannot fold the batch into one
    GEMM and runs a batched matmul against a copy of the weight per batch row (the profile's largest cost).
    """
    x = x.contiguous()
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return layer(x)  # a Linear, or the module that replaced one (cpu_prepack.PrepackedLinear)
    weight = layer.weight.reshape(layer.weight.shape[0], layer.weight.shape[1])
    return F.linear(x, weight, layer.bias)


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the H*W positions, with text (+ image) cross-attention.

    x: `[(B T), C, H, W]`, context: `[(B T), L, C_ctx]` or a `FrameContext` -> `[(B T), C, H, W]`.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        *,
        depth: int = 1,
        context_dim: int | None = None,
        use_linear: bool = True,
        image_cross_attention: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.norm = GroupNorm32(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, heads, head_dim, context_dim, image_cross_attention=image_cross_attention, dropout=dropout
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | FrameContext | None) -> torch.Tensor:
        n, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [N, H*W, C]
        tokens = _pointwise(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = _pointwise(self.proj_out, tokens)
        return x + tokens.transpose(1, 2).reshape(n, c, height, width)


class TemporalTransformer(nn.Module):
    """Self-attention over the T frames of every pixel (tokens `(B H W), T, C`).

    x: `[B, C, T, H, W]` -> same shape.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        *,
        depth: int = 1,
        use_linear: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.norm = GroupNorm32(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv1d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, None, dropout=dropout) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv1d(inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, height, width = x.shape
        # [B, C, T, H, W] -> [B, H, W, T, C] -> tokens [(B H W), T, C]
        tokens = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * height * width, t, c)
        tokens = _pointwise(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        tokens = _pointwise(self.proj_out, tokens)
        # tokens [(B H W), T, C] -> [B, C, T, H, W]
        return x + tokens.reshape(b, height, width, t, c).permute(0, 4, 3, 1, 2)
