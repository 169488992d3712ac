"""Our pipeline on given keyframe pixels and noise, for the side-by-side benchmark.

`ToonCrafterPipeline.__call__` draws its own noise from the request's seed; to compare videos with the
official code the benchmark feeds both the same preprocessed keyframes, posterior noise and x_T (as the
parity tool does with the fixtures), through `ToonCrafterPipeline.sample_video`: steps 2-4 of `__call__`,
the very code a request runs. The benchmark times each step by wrapping `tooncrafter.pipeline.sample_ddim`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tooncrafter.pipeline import ToonCrafterPipeline
from tooncrafter.sampling import generator_noise, randn_tensor


def interpolate_pixels(
    pipe: ToonCrafterPipeline,
    pixels: torch.Tensor,
    *,
    prompt: str,
    steps: int,
    cfg_scale: float,
    eta: float,
    motion_steps: int,
    generator: torch.Generator,
    on_step: Callable[[int, int], None] | None = None,
    posterior_noise: torch.Tensor | None = None,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Two preprocessed keyframes `[2, 3, H, W]` -> the float video `[3, T, H, W]` of their window."""
    config, placement = pipe.config, pipe.placement
    frames, (h, w), channels = config.num_frames, config.latent_size, config.diffusion.channels
    if posterior_noise is None:  # drawn as the pipeline draws them for one window
        drawn = randn_tensor((frames, channels, h, w), generator, "cpu", torch.float32)
        posterior_noise = drawn[[0, frames - 1]]
    if x_T is None:
        x_T = randn_tensor((1, channels, frames, h, w), generator, "cpu", torch.float32)
    callback = (lambda out: on_step(out.index + 1, out.total)) if on_step is not None else None
    videos = pipe.sample_video(
        pixels, [(0, 1)], prompt=prompt, steps=steps, cfg_scale=cfg_scale, eta=eta, motion_steps=motion_steps,
        posterior_noise=posterior_noise, x_T=x_T, noise_fn=generator_noise(generator, placement.device, torch.float32),
        callback=callback,
    )
    return videos[0]
