"""Step 2 of the method, the network side: the UNet as the denoiser `denoise(x, t) -> v` that `sample_ddim` calls.

Classifier-free guidance runs cond and uncond in ONE batched UNet call per step; `guide`
(sampling.py) combines them with the official guidance rescale. Sketch guidance (optional) runs the
sketch encoder on the same rows each step and hands its residuals to that one UNet call; the
uncond rows get the same sketches, as both public re-implementations do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tooncrafter.conditioning import Conditioning
from tooncrafter.model.loader import ToonCrafterComponents
from tooncrafter.model.sketch_encoder import encode_sketches
from tooncrafter.sampling import Denoiser, NoiseSchedule, guide

GUIDANCE_RESCALE = 0.7  # the official sampler's `guidance_rescale`

Velocities = Callable[[torch.Tensor, int], tuple[torch.Tensor, "torch.Tensor | None"]]
"""`velocities(x, t) -> (v_cond, v_uncond or None)`, float32 `[B, C, T, h, w]`."""


def noise_schedule(components: ToonCrafterComponents) -> NoiseSchedule:
    """The checkpoint's own schedule buffers when it has them, else the schedule its config describes."""
    if "alphas_cumprod" in components.schedule_buffers:
        return NoiseSchedule.from_buffers(components.schedule_buffers)
    return NoiseSchedule.from_config(components.config.diffusion)


@dataclass(frozen=True)
class SketchGuidance:
    """Line art for some frames of a batch of B windows: `sketches` `[B, T, 1, H, W]` in [0, 1] (white lines on
    black; zeros where `frame_mask` `[B, T]` is False, which get no guidance), the encoder, and the strength."""

    encoder: nn.Module
    sketches: torch.Tensor
    frame_mask: torch.Tensor
    scale: float


def unet_velocities(
    unet: nn.Module, cond: Conditioning, dtype: torch.dtype, sketch: SketchGuidance | None = None
) -> Velocities:
    """The UNet's v for the cond rows and, when `cond` has an unconditional context, the uncond rows, in one call.

    With `sketch`, the sketch encoder's residuals (`encode_sketches`) for those same rows go into that call."""
    guided = cond.context_uncond is not None
    if guided:
        c_concat = torch.cat([cond.c_concat, cond.c_concat])
        context = torch.cat([cond.context_cond, cond.context_uncond]).to(dtype)
        fs = torch.cat([cond.fs, cond.fs])
    else:
        c_concat, context, fs = cond.c_concat, cond.context_cond.to(dtype), cond.fs
    # built once: the UNet input [x | c_concat] (cond and uncond rows share x) and the timestep vector;
    # each step only writes x and t into them
    batch, channels = cond.c_concat.shape[:2]
    unet_in = torch.cat([torch.empty_like(c_concat), c_concat], dim=1).to(dtype)
    x_slots = unet_in[:, :channels].unflatten(0, (-1, batch))  # [1 or 2, B, C, T, h, w]
    timesteps = torch.empty(unet_in.shape[0], device=unet_in.device, dtype=torch.long)
    if sketch is not None:
        rows = 2 if guided else 1
        sketches = sketch.sketches.to(unet_in.device).repeat(rows, 1, 1, 1, 1)  # [rows B, T, 1, H, W]
        mask = sketch.frame_mask.to(unet_in.device).repeat(rows, 1)
        x_rows = unet_in[:, :channels]  # [rows B, C, T, h, w]: the noisy latent without the concat condition

    def velocities(x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        x_slots.copy_(x.unsqueeze(0))
        timesteps.fill_(t)
        if sketch is None:
            v = unet(unet_in, timesteps, context, fs)
        else:
            residuals = encode_sketches(sketch.encoder, x_rows, timesteps, context, sketches, mask, sketch.scale)
            v = unet(unet_in, timesteps, context, fs, sketch_residuals=residuals)
        v = v.float()
        return v.chunk(2) if guided else (v, None)

    return velocities


def guided_denoiser(
    unet: nn.Module, cond: Conditioning, cfg_scale: float, dtype: torch.dtype, sketch: SketchGuidance | None = None
) -> Denoiser:
    """`denoise(x, t) -> v_guided`: CFG at `cfg_scale` plus guidance rescale (none at all when cfg_scale == 1),
    sketch-guided where `sketch` says."""
    velocities = unet_velocities(unet, cond, dtype, sketch)
    scale = cfg_scale if cond.context_uncond is not None else 1.0

    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        v_cond, v_uncond = velocities(x, t)
        return guide(v_cond, v_uncond, scale, GUIDANCE_RESCALE)[1]

    return denoise
