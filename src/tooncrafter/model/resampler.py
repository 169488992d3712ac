"""The image-token Resampler (`image_proj_model`): CLIP image tokens -> per-frame context tokens.

A Perceiver-style resampler (IP-Adapter / Flamingo) with one set of learned queries per frame:
`num_queries` tokens for each of the `video_length` frames, so the UNet can give frame f its own
image tokens `16f .. 16f+15` next to the 77 text tokens.

Notation (shapes for the 512 model):
    x       CLIP image tokens            [B, 257, embedding_dim]  (1280)
    latents learned queries              [1, num_queries * video_length, dim]  (16 * 16, 1024)
    out     image context tokens         [B, num_queries * video_length, output_dim]  (1024)

Per layer: `latents += PerceiverAttention(x, latents)`, `latents += FF(latents)`; the keys/values
of the attention are `cat([norm1(x), norm2(latents)])`, the queries `norm2(latents)`.
"""

from __future__ import annotations

import torch
from torch import nn

from tooncrafter.model.attention import sdpa_attention
from tooncrafter.model.config import ResamplerConfig


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear (no bias) -> GELU -> Linear (no bias); indices 0, 1, 3 are the checkpoint keys."""
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Queries from the latents; keys and values from the image tokens and the latents together."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.attention_fn = sdpa_attention

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x [B, N, dim], latents [B, L, dim] -> [B, L, dim] (the update, without the residual)."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        # Officially the logits are (q d^-1/4)(k d^-1/4)^T: the same as scale d^-1/2.
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        out = self.attention_fn(q, k, v, self.heads, scale=self.dim_head**-0.5)
        return self.to_out(out)


class Resampler(nn.Module):
    """CLIP image tokens [B, N, embedding_dim] -> [B, num_queries * video_length, output_dim]."""

    def __init__(self, config: ResamplerConfig) -> None:
        super().__init__()
        self.config = config
        num_latents = config.num_queries * config.video_length
        self.latents = nn.Parameter(torch.randn(1, num_latents, config.dim) / config.dim**0.5)
        self.proj_in = nn.Linear(config.embedding_dim, config.dim)
        self.proj_out = nn.Linear(config.dim, config.output_dim)
        self.norm_out = nn.LayerNorm(config.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(config.dim, config.dim_head, config.heads),
                    feed_forward(config.dim, config.ff_mult),
                ]
            )
            for _ in range(config.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.config.embedding_dim:
            raise ValueError(f"resampler: expected image tokens [B, N, {self.config.embedding_dim}], got {tuple(x.shape)}")
        latents = self.latents.expand(x.shape[0], -1, -1)  # [B, (T L), dim]
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))
