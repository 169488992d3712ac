"""ToonCrafter's 3D UNet (`model.diffusion_model` in the official checkpoint).

A Stable-Diffusion-style UNet on frames folded into the batch, `[(B T), C, H, W]`, with three
video additions: temporal convs inside every ResBlock, a temporal transformer after every spatial
transformer (and one right after the input conv, `init_attn`), and a frame-stride (`fs`)
embedding added to the time embedding. Spatial cross-attention sees the text tokens and, per
frame, that frame's image tokens from the Resampler.

Notation:
    B batch, T frames, h/w latent height/width, L context tokens
    emb  time embedding `time_embed(sinusoid(t)) + fps_embedding(sinusoid(fs))`, one row per frame
    hs   skip tensors, pushed on the way down and popped (last first) on the way up
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tooncrafter.model.config import UNetConfig
from tooncrafter.model.frames import fold_frames, unfold_frames
from tooncrafter.model.transformer import TEXT_CONTEXT_LENGTH, FrameContext, SpatialTransformer, TemporalTransformer
from tooncrafter.model.unet_blocks import Downsample, ResBlock, Upsample, normalization, timestep_embedding

# The Resampler's image tokens per frame in the official model (its `num_queries`); the UNet takes
# the per-frame context path only when L == 77 + IMAGE_TOKENS_PER_FRAME * T (official hard-code).
IMAGE_TOKENS_PER_FRAME = 16
# `init_attn` is built with a fixed 8 heads of `num_head_channels` in the official model.
INIT_ATTN_HEADS = 8


class UNetStage(nn.ModuleList):
    """One entry of `input_blocks` / `output_blocks` / `middle_block`: layers applied in order.

    Spatial layers get `[(B T), C, H, W]`; temporal transformers get the unfolded `[B, C, T, H, W]`.
    """

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: FrameContext, num_frames: int) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, num_frames)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, TemporalTransformer):
                h = fold_frames(layer(unfold_frames(h, num_frames)))
            else:
                h = layer(h)
        return h


def _time_mlp(model_channels: int, time_embed_dim: int) -> nn.Sequential:
    # 0 Linear, 1 SiLU, 2 Linear
    return nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))


class UNet3D(nn.Module):
    """The denoiser: `v = UNet3D(cat([x_t, c_concat], 1), t, context, fs)`.

    Args:
        config: the UNet part of the model config.
        image_tokens_per_frame: Resampler tokens per frame (`ResamplerConfig.num_queries`); decides
            when the context is split per frame (16 in the official model, where it is hard-coded).
        text_context_len: text tokens at the start of the context (77, the CLIP length).
    """

    def __init__(
        self,
        config: UNetConfig,
        *,
        image_tokens_per_frame: int = IMAGE_TOKENS_PER_FRAME,
        text_context_len: int = TEXT_CONTEXT_LENGTH,
    ) -> None:
        super().__init__()
        if config.addition_attention and config.num_head_channels <= 0:
            raise ValueError("unet: addition_attention (init_attn) needs num_head_channels > 0 (8 heads of that width)")
        if config.transformer_depth < 1:
            raise ValueError(f"unet: transformer_depth must be >= 1, got {config.transformer_depth}")
        self.config = config
        self.image_tokens_per_frame = image_tokens_per_frame
        self.text_context_len = text_context_len
        mc = config.model_channels
        time_embed_dim = mc * 4

        def resblock(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, ch_out, dropout=config.dropout, temporal_conv=config.temporal_conv)

        def attention_layers(ch: int) -> list[nn.Module]:
            heads, head_dim = config.heads_for(ch)
            layers: list[nn.Module] = [
                SpatialTransformer(
                    ch,
                    heads,
                    head_dim,
                    depth=config.transformer_depth,
                    context_dim=config.context_dim,
                    use_linear=config.use_linear,
                    image_cross_attention=config.image_cross_attention,
                )
            ]
            if config.temporal_attention:
                layers.append(
                    TemporalTransformer(ch, heads, head_dim, depth=config.transformer_depth, use_linear=config.use_linear)
                )
            return layers

        # time and frame-stride embeddings
        self.time_embed = _time_mlp(mc, time_embed_dim)
        if config.fs_condition:
            self.fps_embedding = _time_mlp(mc, time_embed_dim)

        # down path: input conv, then per level `num_res_blocks` x (ResBlock [+ transformers]), then Downsample
        self.input_blocks = nn.ModuleList([UNetStage([nn.Conv2d(config.in_channels, mc, 3, padding=1)])])
        if config.addition_attention:
            # Built without `use_linear` officially, so its projections are 1x1 Conv1d.
            init_attn = TemporalTransformer(
                mc, INIT_ATTN_HEADS, config.num_head_channels, depth=config.transformer_depth, use_linear=False
            )
            self.init_attn = UNetStage([init_attn])
        skip_channels = [mc]
        ch = mc
        ds = 1  # downsampling factor of the current level
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers += attention_layers(ch)
                self.input_blocks.append(UNetStage(layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(UNetStage([Downsample(ch, config.conv_resample)]))
                skip_channels.append(ch)
                ds *= 2

        # middle: ResBlock, transformers, ResBlock (always with attention)
        self.middle_block = UNetStage([resblock(ch, ch), *attention_layers(ch), resblock(ch, ch)])

        # up path: per level `num_res_blocks + 1` x (ResBlock on cat([h, skip]) [+ transformers]) [+ Upsample]
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers += attention_layers(ch)
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch, config.conv_resample))
                    ds //= 2
                self.output_blocks.append(UNetStage(layers))

        # out: 0 GroupNorm, 1 SiLU, 2 conv3x3
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1))

    def _frame_context(self, context: torch.Tensor, num_frames: int) -> FrameContext:
        """`[B, L, C]` -> the text `[B, 77, C]` and this frame's image tokens `[(B T), n, C]` when the context
        holds n per frame (official hard-code); else the rest of the context, shared by every frame `[B, L-77, C]`.

        The official code repeats the context per frame instead; the values every frame sees are the same.
        """
        b, length, c = context.shape
        text, image = context[:, : self.text_context_len].contiguous(), context[:, self.text_context_len :].contiguous()
        if length == self.text_context_len + self.image_tokens_per_frame * num_frames:
            # image tokens are laid out frame after frame: [B, (T n), C] -> [(B T), n, C]
            image = image.reshape(b * num_frames, (length - self.text_context_len) // num_frames, c)
        return FrameContext(text, image)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        fs: torch.Tensor | None = None,
        sketch_residuals: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: `[B, in_channels, T, h, w]` (noisy latent then c_concat), timesteps: int `[B]`,
        context: `[B, L, context_dim]`, fs: int `[B]` or None (-> `default_fs`). Returns `[B, out_channels, T, h, w]`.
        A single timestep or fs value is broadcast over the batch.
        sketch_residuals: the sketch encoder's `len(input_blocks) + 1` tensors `[(B T), C_i, h_i, w_i]`
        (`sketch_encoder.encode_sketches`): the last is added after the middle block, the others to
        the skip of the same index, ControlNet-style. None (default) leaves the computation untouched.
        """
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"unet: x must be [B, {self.config.in_channels}, T, h, w], got {tuple(x.shape)}")
        b, _, num_frames, height, width = x.shape
        if context.ndim != 3 or context.shape[0] != b:
            raise ValueError(f"unet: context must be [B={b}, L, C], got {tuple(context.shape)}")
        mc = self.config.model_channels

        # 1. time: sinusoids in fp32, MLPs in the compute dtype, one embedding row per frame
        timesteps = timesteps.reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps
        emb = self.time_embed(timestep_embedding(timesteps, mc).to(x.dtype))
        if self.config.fs_condition:
            if fs is None:
                fs = torch.full((b,), self.config.default_fs, dtype=torch.long, device=x.device)
            fs = fs.reshape(-1).expand(b) if fs.numel() == 1 else fs
            emb = emb + self.fps_embedding(timestep_embedding(fs, mc).to(x.dtype))
        emb = emb.repeat_interleave(num_frames, dim=0)  # [(B T), 4*mc]

        # 2. context per frame
        context = self._frame_context(context, num_frames)

        # 3. pre-process: fold frames into the batch, [B, C, T, h, w] -> [(B T), C, h, w]
        h = fold_frames(x)

        # 4. down
        hs = []
        for index, stage in enumerate(self.input_blocks):
            h = stage(h, emb, context, num_frames)
            if index == 0 and self.config.addition_attention:
                h = self.init_attn(h, emb, context, num_frames)
            hs.append(h)

        # 5. mid
        h = self.middle_block(h, emb, context, num_frames)
        if sketch_residuals is not None:
            if len(sketch_residuals) != len(hs) + 1:
                raise ValueError(f"unet: sketch_residuals must hold {len(hs) + 1} tensors, got {len(sketch_residuals)}")
            h = h + sketch_residuals[-1]

        # 6. up: each stage takes cat([h, the matching skip (+ its sketch residual)]) on the channel axis
        for stage in self.output_blocks:
            skip = hs.pop()
            if sketch_residuals is not None:
                skip = skip + sketch_residuals[len(hs)]
            h = stage(torch.cat([h, skip], dim=1), emb, context, num_frames)

        # 7. post-process, then unfold frames: [(B T), C, h, w] -> [B, C, T, h, w]
        y = self.out(h).to(x.dtype)  # under autocast the conv runs low precision; hand back x's dtype
        return unfold_frames(y, num_frames)
