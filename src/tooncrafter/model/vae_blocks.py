"""Building blocks of ToonCrafter's KL autoencoder: 2D encoder blocks and the dual-reference video decoder blocks.

Attribute names equal the official checkpoint keys (`norm1`, `conv1`, `nin_shortcut`, `time_stack.in_layers.0`,
`mix_factor`, `time_mix_conv`, `to_q`, ...), so the weights load strictly with no rename table.

Frames are folded into the batch (`[(B T), C, H, W]`) everywhere except inside the temporal layers (`time_stack`,
`time_mix_conv`), which unfold them to `[B, C, T, H, W]` with the `num_frames` they are given, and the reference
refinements, which need to know which frames are the first and last of the decoded chunk.

Notation of the fusion attention (`ReferenceFusionAttention`):
  x       decoder features of every frame, `[(B T), C, h, w]`
  r_0/r_1 encoder features of the first / last keyframe at the same level, `[B, C, h, w]` each
  q = to_q(GN(x)),  k = to_k([r_0; r_1]),  v = to_v([r_0; r_1])   (tokens = spatial positions, r_0's first)
  out = x + to_out(softmax(q k^T / sqrt(d)) v)                    (8 heads of d = 64)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tooncrafter.model.attention import sdpa_attention
from tooncrafter.model.frames import fold_frames, unfold_frames
from tooncrafter.model.norms import GroupNorm32

# The official `MemoryEfficientCrossAttentionWrapperFusion` is built with its default 8 heads of 64 whatever the
# channel count (the tiny checkpoint has `to_q` of shape [512, 32]), so this is part of the architecture, not a
# config value.
FUSION_HEADS = 8
FUSION_HEAD_DIM = 64

GROUPS = 32


def vae_norm(channels: int) -> GroupNorm32:
    """The autoencoder's norm: 32 groups, eps 1e-6 (`Normalize` in the official code)."""
    return GroupNorm32(GROUPS, channels, eps=1e-6)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """2D residual block without time embedding: GN, swish, conv3x3, GN, swish, dropout, conv3x3, plus the skip."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = vae_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = vae_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # 1x1 projection of the skip when the width changes (the checkpoint calls it `nin_shortcut`).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C_in, H, W] -> [N, C_out, H, W]."""
        # in-place SiLU on the fresh norm outputs: one activation-sized temporary less at the decoder's peak
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class TemporalResBlock(nn.Module):
    """The `time_stack` of a VideoResBlock: a residual block of (3,1,1) Conv3d over frames, no time embedding.

    GroupNorm here is the UNet-style one (32 groups, eps 1e-5, fp32).
    """

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        kernel, padding = (3, 1, 1), (1, 0, 0)
        # in_layers: 0 GroupNorm, 1 SiLU, 2 Conv3d
        # (the SiLUs work in place on the fresh GroupNorm outputs: less peak memory in the decoder)
        self.in_layers = nn.Sequential(
            GroupNorm32(GROUPS, channels, eps=1e-5), nn.SiLU(inplace=True), nn.Conv3d(channels, channels, kernel, padding=padding)
        )
        # out_layers: 0 GroupNorm, 1 SiLU, 2 Dropout, 3 Conv3d
        self.out_layers = nn.Sequential(
            GroupNorm32(GROUPS, channels, eps=1e-5),
            nn.SiLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv3d(channels, channels, kernel, padding=padding),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, T, H, W] -> same shape."""
        return x + self.out_layers(self.in_layers(x))


class VideoResBlock(ResnetBlock):
    """ResnetBlock per frame, then a temporal residual block, blended by the learned `a = sigmoid(mix_factor)`:
    `out = a * time_stack(y) + (1 - a) * y`, `y` the per-frame output."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__(in_channels, out_channels, dropout)
        self.time_stack = TemporalResBlock(out_channels, dropout)
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:  # type: ignore[override]
        """x [(B T), C_in, H, W] -> [(B T), C_out, H, W]."""
        y = unfold_frames(super().forward(x), num_frames)
        alpha = torch.sigmoid(self.mix_factor).to(y.dtype)
        # a * y_t + (1 - a) * y as one op (y + a (y_t - y)): fewer activation-sized temporaries
        out = torch.lerp(y, self.time_stack(y), alpha)
        return fold_frames(out)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the h*w positions of each image (the mid block's `attn_1`), scale C^-0.5."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = vae_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.attention_fn = sdpa_attention
        # Images per attention call (None = all at once): bounds the logits memory of the math fallback.
        self.chunk_images: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> same shape."""
        n, c, height, width = x.shape
        h = self.norm(x)
        # [N, C, H, W] -> [N, H*W, C]
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))
        step = n if self.chunk_images is None else max(1, self.chunk_images)
        out = torch.cat([self.attention_fn(q[i : i + step], k[i : i + step], v[i : i + step], 1) for i in range(0, n, step)])
        out = out.transpose(1, 2).reshape(n, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 conv3x3 after zero padding right and bottom by one (asymmetric, as the official encoder)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VideoConv2d(nn.Conv2d):
    """A 2D conv per frame followed by `time_mix_conv`, a (3,1,1) Conv3d over frames (the decoder's `conv_out`)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.time_mix_conv = nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:  # type: ignore[override]
        """x [(B T), C_in, H, W] -> [(B T), C_out, H, W]."""
        h = super().forward(x)
        return fold_frames(self.time_mix_conv(unfold_frames(h, num_frames)))


class Combiner(nn.Module):
    """Reference refinement by addition: a 1x1 conv of each reference, reference 0 added to the first frame of
    the chunk and reference 1 to its last frame (both to the same frame when the chunk has one frame)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """x [(B T), C, h, w], reference [B, C, 2, h, w] -> [(B T), C, h, w]."""
        b = reference.shape[0]
        refs = self.conv(fold_frames(reference)).unflatten(0, (b, 2))  # [B, 2, C, h, w]
        frames = x.unflatten(0, (b, -1)).clone()  # [B, T, C, h, w]
        frames[:, 0] = frames[:, 0] + refs[:, 0]
        frames[:, -1] = frames[:, -1] + refs[:, 1]
        return frames.flatten(0, 1)


class ReferenceFusionAttention(nn.Module):
    """Reference refinement by cross-attention: every frame's positions attend to the tokens of both references.

    Queries come from GroupNorm(x), keys and values from the raw reference features (no norm); 8 heads of 64.
    The attention runs through `self.attention_fn` (SDPA by default) in chunks of `chunk_frames` frames, so the
    attention memory stays bounded by the chunk, not the clip. The references are shared by all frames of a clip,
    so frames are laid along the query axis and the keys are never copied per frame.
    """

    def __init__(self, channels: int, heads: int = FUSION_HEADS, head_dim: int = FUSION_HEAD_DIM) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm = vae_norm(channels)
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        # to_out: 0 Linear, 1 Dropout (the checkpoint keys are `to_out.0.*`)
        self.to_out = nn.Sequential(nn.Linear(inner, channels), nn.Dropout(0.0))
        self.attention_fn = sdpa_attention
        # Frames per attention call (None = all frames of the chunk in one call).
        self.chunk_frames: int | None = 1

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """x [(B T), C, h, w], reference [B, C, 2, h, w] -> [(B T), C, h, w]."""
        bt, c, height, width = x.shape
        b = reference.shape[0]
        num_frames = bt // b
        tokens = height * width
        # q: [(B T), C, h, w] -> [B, T*h*w, inner] (the frames of one clip along the query axis)
        q = self.to_q(self.norm(x).flatten(2).transpose(1, 2)).reshape(b, num_frames * tokens, -1)
        # k, v: [B, C, 2, h, w] -> [B, 2*h*w, C] -> [B, 2*h*w, inner], reference 0's tokens first
        ref_tokens = reference.flatten(2).transpose(1, 2)
        k, v = self.to_k(ref_tokens), self.to_v(ref_tokens)
        step = num_frames if self.chunk_frames is None else max(1, self.chunk_frames)
        out = torch.cat(
            [self.attention_fn(q[:, f * tokens : (f + step) * tokens], k, v, self.heads) for f in range(0, num_frames, step)],
            dim=1,
        )
        out = self.to_out(out)  # [B, T*h*w, C]
        out = out.reshape(bt, tokens, c).transpose(1, 2).reshape(bt, c, height, width)
        return x + out
