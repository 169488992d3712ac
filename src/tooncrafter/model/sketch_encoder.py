"""ToonCrafter's sketch encoder: a ControlNet over one-channel line art (`sketch_encoder.ckpt`).

The authors released the weights but not the code. Its key layout is the one of Stable Diffusion's
ControlNet (lllyasviel's `cldm.ControlNet`) with `hint_channels=1` and the 512 UNet's widths, as
the public re-implementations build it (mattyamonaca/ToonCrafter_with_SketchGuidance,
`cldm/cldm.py` + `configs/cldm_v21.yaml`; kijai/ComfyUI-DynamiCrafterWrapper,
`lvdm/modules/networks/openaimodel3d.py` `ControlNet` + `nodes.py`). Both load the file strictly.

The network is frame-independent: a copy of the UNet's 2D down path (ResBlocks without temporal
convs, spatial transformers without the image branch, no fs embedding, no temporal layers) that
sees one frame's noisy latent (not the concat condition) and its sketch. The sketch, white lines on
black in [0, 1] at pixel size, goes through `input_hint_block` (eight convs, three of them stride 2:
pixels -> latent size) and is added after the input conv. Each of the 12 down stages and the middle
block ends in a 1x1 conv (`zero_convs.N`, `middle_block_out`); those 13 tensors are the residuals
the UNet adds (see `UNet3D.forward(sketch_residuals=...)`).

Notation:
    N  rows = (batch, frame) pairs that have a sketch; h/w latent size, H/W pixel size
    emb the encoder's own time embedding `time_embed(sinusoid(t))`, one row per N

Cross-attention context (the one place the two re-implementations differ): kijai builds the
spatial transformers from ToonCrafter's own attention code, which keeps only the 77 text tokens
when the image branch is off (`context_tokens="text"`, our default: the released weights have no
image-branch keys, and the authors' code base is that one); mattyamonaca uses Stable Diffusion's
attention, which attends to the whole context, text and every frame's image tokens
(`context_tokens="all"`). Both are tested against their reference.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from tooncrafter.model.checkpoint import CheckpointError, load_into, read_state_dict
from tooncrafter.model.config import UNetConfig
from tooncrafter.model.transformer import (
    TEXT_CONTEXT_LENGTH,
    Attention,
    SpatialTransformer,
)
from tooncrafter.model.unet import UNetStage
from tooncrafter.model.unet_blocks import Downsample, ResBlock, timestep_embedding

# `input_hint_block` widths, fixed in ControlNet (independent of model_channels); three stride-2
# convs take the sketch from pixel to latent size (8x, the VAE's factor).
HINT_WIDTHS: tuple[int, ...] = (16, 32, 96, 256)
HINT_DOWNSAMPLE = 2 ** (len(HINT_WIDTHS) - 1)
# The released encoder reads one-channel line art.
SKETCH_CHANNELS = 1
# (The guidance strength's default, 0.6 in both re-implementations, is the endpoint's: schema.DEFAULT_SKETCH_SCALE.)
SKETCH_COMPONENT = "sketch_encoder"

ContextTokens = Literal["text", "all"]


@dataclass(frozen=True)
class SketchEncoderConfig:
    """The ControlNet arguments; `from_unet` takes every shared width from the main UNet config."""

    in_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_head_channels: int
    context_dim: int
    num_heads: int = -1
    transformer_depth: int = 1
    use_linear: bool = True
    conv_resample: bool = True
    hint_channels: int = SKETCH_CHANNELS
    context_tokens: ContextTokens = "text"
    text_context_len: int = TEXT_CONTEXT_LENGTH

    def __post_init__(self) -> None:
        if self.context_tokens not in ("text", "all"):
            raise ValueError(f"sketch encoder: context_tokens must be 'text' or 'all', got {self.context_tokens!r}")
        if self.model_channels % 32:
            raise ValueError(f"sketch encoder: model_channels={self.model_channels} must be a multiple of 32 (GroupNorm)")

    @classmethod
    def from_unet(cls, unet: UNetConfig, *, context_tokens: ContextTokens = "text") -> SketchEncoderConfig:
        """The encoder that fits `unet`: same widths, levels, heads and context; latent channels in."""
        return cls(
            in_channels=unet.out_channels,  # the noisy latent only, not the concat condition
            model_channels=unet.model_channels,
            channel_mult=unet.channel_mult,
            num_res_blocks=unet.num_res_blocks,
            attention_resolutions=unet.attention_resolutions,
            num_head_channels=unet.num_head_channels,
            num_heads=unet.num_heads,
            context_dim=unet.context_dim,
            transformer_depth=unet.transformer_depth,
            use_linear=unet.use_linear,
            conv_resample=unet.conv_resample,
            context_tokens=context_tokens,
        )

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) as ControlNet picks them with `legacy=False` (same rule as the UNet)."""
        if self.num_head_channels > 0:
            if channels % self.num_head_channels:
                raise ValueError(f"sketch encoder: {channels} channels not divisible by num_head_channels={self.num_head_channels}")
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


def _hint_block(hint_channels: int, model_channels: int) -> nn.Sequential:
    """Sketch [N, 1, H, W] -> [N, model_channels, H/8, W/8]: conv3x3 + SiLU pairs, even indices are convs."""
    layers: list[nn.Module] = [nn.Conv2d(hint_channels, HINT_WIDTHS[0], 3, padding=1), nn.SiLU()]
    for width_in, width_out in itertools.pairwise(HINT_WIDTHS):
        layers += [nn.Conv2d(width_in, width_in, 3, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(width_in, width_out, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(HINT_WIDTHS[-1], model_channels, 3, padding=1))
    return nn.Sequential(*layers)


def _time_mlp(model_channels: int, time_embed_dim: int) -> nn.Sequential:
    # 0 Linear, 1 SiLU, 2 Linear
    return nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))


def _zero_conv(channels: int) -> nn.Sequential:
    # index 0: the 1x1 conv (zero-initialised in training, hence the name)
    return nn.Sequential(nn.Conv2d(channels, channels, 1))


class SketchEncoder(nn.Module):
    """`residuals = SketchEncoder(x_t, sketch, t, context)`: 13 tensors, one per UNet skip + the middle.

    Attribute names are the checkpoint's keys (`input_hint_block`, `input_blocks`, `zero_convs`,
    `middle_block`, `middle_block_out`, `time_embed`).
    """

    def __init__(self, config: SketchEncoderConfig) -> None:
        super().__init__()
        self.config = config
        mc = config.model_channels
        time_embed_dim = mc * 4

        def resblock(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, ch_out, temporal_conv=False)

        def transformer(ch: int) -> SpatialTransformer:
            heads, head_dim = config.heads_for(ch)
            return SpatialTransformer(
                ch, heads, head_dim, depth=config.transformer_depth, context_dim=config.context_dim, use_linear=config.use_linear
            )

        self.time_embed = _time_mlp(mc, time_embed_dim)
        self.input_hint_block = _hint_block(config.hint_channels, mc)
        self.input_blocks = nn.ModuleList([UNetStage([nn.Conv2d(config.in_channels, mc, 3, padding=1)])])
        self.zero_convs = nn.ModuleList([_zero_conv(mc)])
        ch, ds = mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(UNetStage(layers))
                self.zero_convs.append(_zero_conv(ch))
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(UNetStage([Downsample(ch, config.conv_resample)]))
                self.zero_convs.append(_zero_conv(ch))
                ds *= 2
        self.middle_block = UNetStage([resblock(ch, ch), transformer(ch), resblock(ch, ch)])
        self.middle_block_out = _zero_conv(ch)
        # The encoder hands its attention exactly the tokens to attend to (see `_context`), so the
        # cross-attention must not cut the context after the text itself.
        for module in self.modules():
            if isinstance(module, Attention):
                module.text_context_len = None

    @property
    def num_residuals(self) -> int:
        return len(self.input_blocks) + 1

    def _context(self, context: torch.Tensor) -> torch.Tensor:
        return context[:, : self.config.text_context_len] if self.config.context_tokens == "text" else context

    def forward(
        self, x: torch.Tensor, sketch: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> list[torch.Tensor]:
        """x: `[N, in_channels, h, w]` noisy latent frames, sketch: `[N, 1, 8h, 8w]` in [0, 1] (white
        lines on black), timesteps: `[N]`, context: `[N, L, context_dim]` (the UNet's whole context of
        that row's batch element). Returns 13 tensors `[N, C_i, h_i, w_i]` in UNet skip order, middle last.
        """
        n, _, height, width = x.shape
        if sketch.shape[0] != n or sketch.shape[1] != self.config.hint_channels:
            raise ValueError(f"sketch encoder: sketch must be [{n}, {self.config.hint_channels}, H, W], got {tuple(sketch.shape)}")
        if tuple(sketch.shape[2:]) != (height * HINT_DOWNSAMPLE, width * HINT_DOWNSAMPLE):
            raise ValueError(
                f"sketch encoder: sketch size {tuple(sketch.shape[2:])} must be {HINT_DOWNSAMPLE}x the latent size "
                f"{(height, width)}"
            )
        # 1. time: sinusoid in fp32, MLP in the compute dtype
        emb = self.time_embed(timestep_embedding(timesteps.reshape(-1).expand(n), self.config.model_channels).to(x.dtype))
        context = self._context(context)
        # 2. sketch -> latent-size features, added after the input conv
        hint = self.input_hint_block(sketch.to(x.dtype))
        # 3. down path and middle, each ending in its 1x1 conv; frames are separate rows (num_frames=1)
        residuals = []
        h = x
        for index, (stage, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = stage(h, emb, context, 1)
            if index == 0:
                h = h + hint
            residuals.append(zero_conv(h))
        h = self.middle_block(h, emb, context, 1)
        residuals.append(self.middle_block_out(h))
        return residuals


def build_sketch_encoder_on_meta(config: SketchEncoderConfig) -> SketchEncoder:
    with torch.device("meta"):
        return SketchEncoder(config)


def load_sketch_encoder(
    path: str | Path,
    config: SketchEncoderConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> SketchEncoder:
    """Read `sketch_encoder.ckpt` (or a `.safetensors` of its keys) and load it strictly.

    The file is read memory-mapped without executing pickled code; every key must land and every
    shape match (`CheckpointError` naming the keys otherwise).
    """
    state = read_state_dict(path)
    if not state:
        raise CheckpointError(f"{path}: the sketch encoder checkpoint holds no tensors")
    module = build_sketch_encoder_on_meta(config)
    try:
        return load_into(module, state, SKETCH_COMPONENT, device=device, dtype=dtype)  # type: ignore[return-value]
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def encode_sketches(
    encoder: SketchEncoder,
    x_noisy: torch.Tensor,
    timesteps: torch.Tensor,
    context: torch.Tensor,
    sketches: torch.Tensor,
    frame_mask: torch.Tensor,
    scale: float,
) -> list[torch.Tensor] | None:
    """The residuals for `UNet3D(..., sketch_residuals=...)`, or None when there is nothing to add.

    x_noisy: `[B, C, T, h, w]` the noisy latent (the UNet input without the concat condition);
    timesteps: `[B]` (or one value); context: `[B, L, C_ctx]` the same rows the UNet gets (under
    CFG: cond rows then uncond rows; both reference implementations give the uncond pass the same
    sketches); sketches: `[T, 1, H, W]` shared by the batch or `[B, T, 1, H, W]`, in [0, 1], white
    lines on black; frame_mask: bool `[T]` or `[B, T]`, True where a frame has a sketch.

    The encoder is frame-independent, so it runs only on the sketched (batch, frame) rows; the
    other frames get zero residuals, i.e. no guidance. Returns 13 tensors `[(B T), C_i, h_i, w_i]`
    (frames folded into the batch like the UNet's skips), multiplied by `scale`; None when `scale`
    is 0 or no frame is sketched, so the UNet output stays bit-identical to an unguided call.
    """
    if x_noisy.ndim != 5:
        raise ValueError(f"sketch guidance: x_noisy must be [B, C, T, h, w], got {tuple(x_noisy.shape)}")
    b, c, t, h, w = x_noisy.shape
    mask = frame_mask.to(device=x_noisy.device, dtype=torch.bool)
    if mask.ndim == 1 and mask.shape[0] == t:
        mask = mask.expand(b, t)
    if tuple(mask.shape) != (b, t):
        raise ValueError(f"sketch guidance: frame_mask must be [T={t}] or [B={b}, T={t}], got {tuple(frame_mask.shape)}")
    if scale == 0 or not bool(mask.any()):
        return None
    if sketches.ndim == 4 and sketches.shape[0] == t:
        sketches = sketches.expand(b, *sketches.shape)
    if sketches.ndim != 5 or tuple(sketches.shape[:2]) != (b, t):
        raise ValueError(f"sketch guidance: sketches must be [T={t}, 1, H, W] or [B={b}, T={t}, 1, H, W], got {tuple(sketches.shape)}")
    rows = mask.reshape(-1).nonzero().squeeze(1)  # indices into (B T)
    batch_of_row = rows // t
    # fold frames into the batch like the UNet: [B, C, T, h, w] -> [(B T), C, h, w], keep sketched rows
    x_rows = x_noisy.transpose(1, 2).reshape(b * t, c, h, w)[rows]
    sketch_rows = sketches.reshape(b * t, *sketches.shape[2:])[rows].to(device=x_noisy.device)
    timesteps = timesteps.reshape(-1).expand(b)
    residuals = encoder(x_rows, sketch_rows, timesteps[batch_of_row], context[batch_of_row])
    scattered = []
    for residual in residuals:
        full = residual.new_zeros((b * t, *residual.shape[1:]))
        full[rows] = residual * scale
        scattered.append(full)
    return scattered
