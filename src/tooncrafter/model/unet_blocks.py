"""Convolutional building blocks of the 3D UNet: timestep sinusoid, ResBlock with temporal convs, resampling.

Layout convention: the spatial layers see frames folded into the batch, `[(B T), C, H, W]`; the
temporal conv stack unfolds them to `[B, C, T, H, W]`. Touchy numerics (GroupNorm statistics and
the timestep sinusoid) are computed in fp32 and cast back, so fp16/bf16 weights behave.

Attribute names equal the official checkpoint keys (`in_layers`, `emb_layers`, `out_layers`,
`skip_connection`, `temopral_conv` (sic), `op`, `conv`), so state dicts load with no rename table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tooncrafter.model.frames import fold_frames, unfold_frames
from tooncrafter.model.norms import GroupNorm32


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `cat([cos(t f), sin(t f)])`, `f_k = max_period^(-k/half)`, always fp32.

    timesteps: `[N]` (integer or float). Returns `[N, dim]` float32 (zero padded when `dim` is odd).
    The official order is cosine first; callers cast to their compute dtype.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The UNet's standard norm: 32 groups (fixed in the official model), fp32 statistics."""
    return GroupNorm32(32, channels, eps=eps)


class TemporalConvBlock(nn.Module):
    """Four `GN -> SiLU -> [Dropout] -> Conv3d(3,1,1)` stages along time, added to the input.

    x: `[B, C, T, H, W]` -> same shape. Stage indices follow the checkpoint: `convN.0` is the norm,
    the conv is `conv1.2` / `conv{2,3,4}.3` (a Dropout sits before the conv in stages 2-4).
    """

    def __init__(self, channels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv1 = _temporal_stage(channels, None)
        self.conv2, self.conv3, self.conv4 = (_temporal_stage(channels, dropout) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for stage in (self.conv1, self.conv2, self.conv3, self.conv4):
            h = stage(h)
        return x + h


def _temporal_stage(channels: int, dropout: float | None) -> nn.Sequential:
    """`GN -> SiLU -> [Dropout] -> Conv3d` with a kernel of 3 along time only (1x1 in space)."""
    layers: list[nn.Module] = [normalization(channels), nn.SiLU()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Spatial residual block conditioned on the (per-frame) time embedding, then temporal convs.

    h = conv3x3(SiLU(GN(x))); h += Linear(SiLU(emb)); h = conv3x3(Dropout(SiLU(GN(h)))); h += skip(x);
    then (if enabled) the TemporalConvBlock on the unfolded `[B, C, T, H, W]` view.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        *,
        dropout: float = 0.0,
        temporal_conv: bool = True,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.out_channels = out_channels
        # in_layers: 0 GroupNorm, 1 SiLU, 2 conv3x3
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        # emb_layers: 0 SiLU, 1 Linear
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # out_layers: 0 GroupNorm, 1 SiLU, 2 Dropout, 3 conv3x3
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        if temporal_conv:
            # The checkpoint dictates the spelling; its dropout is fixed at 0.1 in the official model.
            self.temopral_conv = TemporalConvBlock(out_channels, dropout=0.1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: `[(B T), C, H, W]`, emb: `[(B T), E]` -> `[(B T), C_out, H, W]`."""
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        h = self.skip_connection(x) + h
        if hasattr(self, "temopral_conv"):
            h = fold_frames(self.temopral_conv(unfold_frames(h, num_frames)))
        return h


class Downsample(nn.Module):
    """Halve H and W: conv3x3 stride 2 (or 2x2 average pooling when `use_conv` is False)."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest neighbour, then conv3x3 (when `use_conv`)."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x
