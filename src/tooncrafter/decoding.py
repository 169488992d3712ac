"""Step 3 of the method: sampled latents -> video, through the dual-reference decoder and the official splice."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tooncrafter.placement import Placement


def decode_with_splice(vae: nn.Module, z: torch.Tensor, refs: Sequence[torch.Tensor], *, chunk_frames: int) -> torch.Tensor:
    """Unscaled latents `[B, C, T, h, w]` -> video `[B, 3, T, H, W]`, as the official scripts decode.

    They decode twice and splice: the two middle frames come from a second decode without latent
    frames 1 and T-2 (`del index[1]; del index[-2]`), so that the references land on that decode's
    first and last frame again. For T = 3 that leaves [2], whose one frame the slices broadcast onto
    frames 0 and 1; for T = 2 the official code fails, and there is no splice here.
    """
    num_frames = z.shape[2]
    full = vae.decode(z, refs, chunk_frames=chunk_frames)
    if num_frames >= 3:
        keep = list(range(num_frames))
        del keep[1]
        del keep[-2]
        mid = vae.decode(z[:, :, keep], refs, chunk_frames=chunk_frames)
        half = num_frames // 2
        full[:, :, half - 1 : half + 1] = mid[:, :, half - 2 : half]
    return full


@torch.no_grad()
def decode_latents(
    vae: nn.Module, latents: torch.Tensor, ref_context: Sequence[torch.Tensor], *, scale_factor: float, placement: Placement
) -> torch.Tensor:
    """Scaled latents `[B, C, T, h, w]` -> float32 video `[B, 3, T, H, W]` (not clamped), each window against its
    own two references `ref_context` (5 x `[B, C_i, 2, h_i, w_i]`)."""
    z = (latents / scale_factor).to(placement.device, placement.dtype)
    refs = [r.to(placement.device, placement.dtype) for r in ref_context]
    with placement.resident(vae):
        video = decode_with_splice(vae, z, refs, chunk_frames=latents.shape[2])
    return video.float()
