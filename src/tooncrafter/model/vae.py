"""ToonCrafter's KL autoencoder: a per-frame 2D encoder and the dual-reference video decoder.

Official classes: `AutoencoderKL_Dualref` (lvdm/models/autoencoder.py), `Encoder` (lvdm/modules/networks/
ae_modules.py) and `VideoDecoder` with `time_mode="conv-only"` (lvdm/models/autoencoder_dualref.py); the math is
described in sections 4.2 and 4.8 of `reference/README.md`.

* Encode is per image: frames are folded into the batch by the caller. It returns the posterior moments (after
  `quant_conv`) and five hidden states per image, the decoder's references: the output of each level (before its
  downsample) from the finest to the coarsest, then the `conv_in` output.
* Decode takes unscaled latents `z = x0 / scale_factor` of a clip and the references of its first and last
  keyframe. The decoder adds time mixing (a temporal conv in every residual block and after `conv_out`) and, at each
  level, injects the references: by addition to the first/last frame (`Combiner`, levels 0, 1 and after the last
  norm) or by cross-attention of every frame to both references (levels 2 and 3).
* `post_quant_conv` is in the checkpoint but the official decode with keyword arguments skips it; so do we.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tooncrafter.model.config import VAEConfig
from tooncrafter.model.frames import fold_frames, unfold_frames
from tooncrafter.model.vae_blocks import (
    Combiner,
    Downsample,
    ReferenceFusionAttention,
    ResnetBlock,
    SpatialSelfAttention,
    Upsample,
    VideoConv2d,
    VideoResBlock,
    swish,
    vae_norm,
)

# Decoder levels whose reference refinement is cross-attention (the others use a Combiner); fixed in the
# official `Decoder` (`attn_level=[2, 3]`), not read from the config.
FUSION_LEVELS = (2, 3)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class EncoderOutput:
    """Posterior of the encoder for N images plus the decoder references.

    moments: [N, 2*embed_dim, h, w] (mean then log-variance, after `quant_conv`).
    hidden_states: 5 tensors (for a 4-level encoder) `[N, C_i, H_i, W_i]`: level 0 .. level L-1 outputs, then the
    `conv_in` output.
    """

    moments: torch.Tensor
    hidden_states: list[torch.Tensor]

    @property
    def mean(self) -> torch.Tensor:
        return self.moments.chunk(2, dim=1)[0]

    @property
    def logvar(self) -> torch.Tensor:
        return self.moments.chunk(2, dim=1)[1].clamp(LOGVAR_MIN, LOGVAR_MAX)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """`mean + std * noise`: the posterior sampled with noise drawn by the caller (in the official order)."""
        mean = self.mean
        return mean + self.std * noise.to(device=mean.device, dtype=mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean


class _Level(nn.Module):
    """One resolution level: its residual blocks and, except at the end of the chain, a resampler.

    Attribute names follow the checkpoint: `block.{i}`, `downsample` (encoder) or `upsample` (decoder).
    """

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None = None, upsample: nn.Module | None = None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample


class _Mid(nn.Module):
    """Middle of encoder/decoder: residual block, single-head self-attention, residual block."""

    def __init__(self, block_1: nn.Module, attn_1: nn.Module, block_2: nn.Module) -> None:
        super().__init__()
        self.block_1 = block_1
        self.attn_1 = attn_1
        self.block_2 = block_2


class Encoder(nn.Module):
    """2D encoder: conv_in, L levels of ResnetBlocks (+ downsample), mid, GN, swish, conv_out -> 2*z_channels."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch = config.ch
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        levels = []
        block_in = ch
        for i, mult in enumerate(config.ch_mult):
            block_out = ch * mult
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, config.dropout))
                block_in = block_out
            last = i == len(config.ch_mult) - 1
            levels.append(_Level(blocks, downsample=None if last else Downsample(block_in)))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(
            ResnetBlock(block_in, block_in, config.dropout),
            SpatialSelfAttention(block_in),
            ResnetBlock(block_in, block_in, config.dropout),
        )
        self.norm_out = vae_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [N, C_in, H, W] -> (h [N, 2*z_channels, h, w], hidden states as in `EncoderOutput`)."""
        first = self.conv_in(x)
        h = first
        hidden_states = []
        for level in self.down:
            for block in level.block:
                h = block(h)
            hidden_states.append(h)  # the level's output, before its downsample
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        hidden_states.append(first)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h))), hidden_states


class VideoDecoder(nn.Module):
    """Dual-reference video decoder (`VideoDecoder`, conv-only time mixing) on frames folded into the batch."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, num_levels = config.ch, len(config.ch_mult)
        block_in = ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(
            VideoResBlock(block_in, block_in, config.dropout),
            SpatialSelfAttention(block_in),
            VideoResBlock(block_in, block_in, config.dropout),
        )
        # Built from the coarsest level down, stored by level index (up.0 is the finest), as the checkpoint.
        levels: dict[int, nn.Module] = {}
        refinements: dict[int, nn.Module] = {}
        for i in reversed(range(num_levels)):
            block_out = ch * config.ch_mult[i]
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(VideoResBlock(block_in, block_out, config.dropout))
                block_in = block_out
            levels[i] = _Level(blocks, upsample=Upsample(block_in) if i != 0 else None)
            refinements[i] = ReferenceFusionAttention(block_in) if i in FUSION_LEVELS else Combiner(block_in)
        self.up = nn.ModuleList(levels[i] for i in range(num_levels))
        # attn_refinement.{level} for each level, then one more Combiner after the final norm.
        self.attn_refinement = nn.ModuleList([refinements[i] for i in range(num_levels)] + [Combiner(block_in)])
        self.norm_out = vae_norm(block_in)
        self.conv_out = VideoConv2d(block_in, config.out_ch)
        # Features in channels-last layout (the result does not depend on it). The convolutions keep the layout
        # of their input, the 5-D views of the temporal layers are then channels-last-3d, and the attentions'
        # token views are contiguous. mid fp32 decode on CPU, one process alternating: 29 vs 35 CPU s.
        self.channels_last = True

    def forward(self, z: torch.Tensor, ref_context: Sequence[torch.Tensor], num_frames: int) -> torch.Tensor:
        """z [(B T), z_channels, h, w] with T = num_frames, ref_context 5 x [B, C_i, 2, h_i, w_i] -> [(B T), out_ch, H, W]."""
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        # 1. latent to features, middle
        h = self.conv_in(z)
        h = self.mid.block_1(h, num_frames)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, num_frames)
        # 2. levels, coarsest first: blocks, reference refinement, upsample
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h, num_frames)
            h = self.attn_refinement[i](h, ref_context[i])
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        # 3. out: norm, swish, final refinement with the conv_in references, conv + temporal conv
        h = F.silu(self.norm_out(h), inplace=True)  # swish, in place on the fresh norm output
        h = self.attn_refinement[-1](h, ref_context[-1])
        return self.conv_out(h, num_frames)


class AutoencoderDualRef(nn.Module):
    """`first_stage_model`: encoder, `quant_conv`, `post_quant_conv` (loaded, unused) and the video decoder."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = VideoDecoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        # Kept so the checkpoint loads strictly; the official dual-reference decode never applies it.
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def num_references(self) -> int:
        """Reference tensors the decoder takes: one per level plus the `conv_in` one."""
        return len(self.config.ch_mult) + 1

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        """x [N, C_in, H, W] in [-1, 1] (frames folded by the caller) -> posterior moments and hidden states."""
        h, hidden_states = self.encoder(x)
        return EncoderOutput(moments=self.quant_conv(h), hidden_states=hidden_states)

    @staticmethod
    def reference_context(hidden_states: Sequence[torch.Tensor], num_frames: int) -> list[torch.Tensor]:
        """Decoder references from the hidden states of a `num_frames`-frame encode (frames folded `(b t)`).

        Each `[(B T), C, h, w]` becomes `[B, C, 2, h, w]` holding frame 0 (reference 0) and frame T-1 (reference 1).
        """
        refs = []
        for hidden in hidden_states:
            if hidden.shape[0] % num_frames:
                raise ValueError(f"vae: hidden state batch {hidden.shape[0]} is not a multiple of num_frames={num_frames}")
            video = unfold_frames(hidden, num_frames)  # [B, C, T, h, w]
            refs.append(torch.stack([video[:, :, 0], video[:, :, -1]], dim=2))
        return refs

    def set_attention_chunk(self, frames: int | None) -> None:
        """Frames (images) per attention call in the decoder's fusion and mid attentions and the encoder's mid
        attention; None = all at once. Results do not depend on it, only peak memory."""
        for module in self.modules():
            if isinstance(module, ReferenceFusionAttention):
                module.chunk_frames = frames
            elif isinstance(module, SpatialSelfAttention):
                module.chunk_images = frames

    def _check_references(self, z: torch.Tensor, ref_context: Sequence[torch.Tensor]) -> None:
        if len(ref_context) != self.num_references:
            raise ValueError(f"vae: decode needs {self.num_references} reference tensors, got {len(ref_context)}")
        for i, ref in enumerate(ref_context):
            if ref.dim() != 5 or ref.shape[0] != z.shape[0] or ref.shape[2] != 2:
                raise ValueError(
                    f"vae: ref_context[{i}] must be [B={z.shape[0]}, C, 2, h, w] (first and last keyframe), "
                    f"got {tuple(ref.shape)}"
                )

    def decode(self, z: torch.Tensor, ref_context: Sequence[torch.Tensor], chunk_frames: int | None = None) -> torch.Tensor:
        """Unscaled latents z [B, embed_dim, T, h, w] -> video [B, out_ch, T, H, W].

        `ref_context`: `num_references` tensors `[B, C_i, 2, h_i, w_i]` (see `reference_context`).
        The clip is decoded in chunks of `chunk_frames` frames (the official code uses the model's temporal length;
        None = all T at once). Every chunk gets the same references, as in the official code: the Combiners add
        reference 0 to the chunk's first frame and reference 1 to its last, and the temporal convs see only the
        chunk, so the chunk length changes the result (it is part of the method, not only a memory knob).
        """
        if z.dim() != 5:
            raise ValueError(f"vae: decode expects z of shape [B, C, T, h, w], got {tuple(z.shape)}")
        if z.shape[1] != self.config.z_channels:
            raise ValueError(
                f"vae: decode needs z_channels={self.config.z_channels} latent channels (post_quant_conv is not "
                f"applied), got {z.shape[1]}"
            )
        self._check_references(z, ref_context)
        num_frames = z.shape[2]
        step = num_frames if chunk_frames is None else chunk_frames
        if step < 1:
            raise ValueError(f"vae: chunk_frames must be >= 1, got {chunk_frames}")
        chunks = []
        for start in range(0, num_frames, step):
            chunk = z[:, :, start : start + step]
            length = chunk.shape[2]
            out = self.decoder(fold_frames(chunk), ref_context, length)  # frames folded (b t) for the decoder
            chunks.append(unfold_frames(out, length))
        return torch.cat(chunks, dim=2)
