"""The official-style baseline, built from our own modules but run the way the official scripts run it.

What it does like `scripts/evaluation/inference.py` + `DDIMSampler` (and what our pipeline does instead):
* every component built normally (random init first) and resident; the checkpoint read fully into RAM
  (`torch.load(weights_only=True, mmap=False)`) and copied in with `load_state_dict` (ours: mmap + meta + assign);
* fp32, attention as plain softmax matmuls (`math_attention`, also in the decoder: no chunking) (ours: SDPA);
* the VAE encodes all T frames of the repeated keyframe video (ours: the distinct keyframes once);
* text and image embeddings computed per request, for the empty prompt and the zero image too (ours: cached);
* cond and uncond as two batch-1 UNet calls per step (ours: one batch-2 call);
* the two full decodes (T frames, then T-2 frames) and the middle-frame splice (ours: the same).
The sampler math (`sampling.py`) is shared: the DDIM update is negligible next to the UNet.
"""

from __future__ import annotations

from typing import Callable

import torch

from tooncrafter.model.attention import math_attention, set_attention_function
from tooncrafter.model.checkpoint import component_state_dict, schedule_buffers
from tooncrafter.model.clip import ImageEncoder, TextEncoder
from tooncrafter.model.config import ToonCrafterConfig
from tooncrafter.model.resampler import Resampler
from tooncrafter.model.unet import UNet3D
from tooncrafter.model.vae import AutoencoderDualRef
from tooncrafter.decoding import decode_with_splice
from tooncrafter.denoising import GUIDANCE_RESCALE
from tooncrafter.sampling import (
    NoiseSchedule,
    ddim_schedule,
    generator_noise,
    guide,
    randn_tensor,
    sample_ddim,
)


class OfficialStyleBaseline:
    def __init__(self, config: ToonCrafterConfig, checkpoint_path: str, device: torch.device) -> None:
        self.config = config
        self.device = device
        modules = {
            "unet": UNet3D(config.unet, image_tokens_per_frame=config.resampler.num_queries),
            "vae": AutoencoderDualRef(config.vae),
            "resampler": Resampler(config.resampler),
            "text_encoder": TextEncoder(config.text_encoder),
            "image_encoder": ImageEncoder(config.image_encoder),
        }
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=False)["state_dict"]
        for name, module in modules.items():
            module.load_state_dict(component_state_dict(state, name), strict=True)
            module.to(device).eval().requires_grad_(False)
            set_attention_function(module, math_attention)
        self.schedule = NoiseSchedule.from_buffers(schedule_buffers(state))
        del state
        modules["vae"].set_attention_chunk(None)
        self.unet, self.vae = modules["unet"], modules["vae"]
        self.resampler = modules["resampler"]
        self.text_encoder, self.image_encoder = modules["text_encoder"], modules["image_encoder"]

    @torch.no_grad()
    def __call__(
        self,
        pixels: torch.Tensor,
        *,
        prompt: str,
        steps: int,
        cfg_scale: float,
        eta: float,
        motion_steps: int,
        generator: torch.Generator,
        on_step: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Two keyframes `[2, 3, H, W]` -> video `[1, 3, T, H, W]` (same noise draws as our pipeline)."""
        cfg = self.config
        frames, (h, w), channels = cfg.num_frames, cfg.latent_size, cfg.diffusion.channels
        dev = self.device
        pixels = pixels.to(dev)
        # official input video: key 1 repeated T/2 times, then key 2
        video = torch.cat([pixels[:1].expand(frames // 2, -1, -1, -1), pixels[1:].expand(frames - frames // 2, -1, -1, -1)])
        posterior_noise = randn_tensor((frames, channels, h, w), generator, "cpu", torch.float32)
        x_T = randn_tensor((1, channels, frames, h, w), generator, "cpu", torch.float32)

        # VAE encode of all T frames, sampled posterior, concat condition of the first and last latent
        enc = self.vae.encode(video)
        z = cfg.diffusion.scale_factor * enc.sample(posterior_noise.to(dev))
        c_concat = torch.zeros(1, channels, frames, h, w, device=dev)
        c_concat[:, :, 0], c_concat[:, :, -1] = z[0], z[-1]
        refs = self.vae.reference_context(enc.hidden_states, frames)

        # text and image context, cond and uncond (empty prompt, zero image), computed per request
        tok = self.text_encoder.tokenize
        text_c = self.text_encoder(tok([prompt]).to(dev))
        text_u = self.text_encoder(tok([""]).to(dev))
        image_c = self.resampler(self.image_encoder(pixels[:1]))
        image_u = self.resampler(self.image_encoder(torch.zeros_like(pixels[:1])))
        context_c, context_u = torch.cat([text_c, image_c], 1), torch.cat([text_u, image_u], 1)
        fs = torch.full((1,), motion_steps, device=dev, dtype=torch.long)

        def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
            x_in = torch.cat([x, c_concat], dim=1)
            ts = torch.full((1,), t, device=dev, dtype=torch.long)
            v_c = self.unet(x_in, ts, context_c, fs)
            v_u = self.unet(x_in, ts, context_u, fs)
            return guide(v_c, v_u, cfg_scale, GUIDANCE_RESCALE)[1]

        plan = ddim_schedule(self.schedule, steps, eta)
        latents = sample_ddim(denoise, x_T.to(dev), plan, generator_noise(generator, dev, torch.float32),
                              callback=(lambda out: on_step(out.index + 1, out.total)) if on_step else None)

        # the two full decodes and the middle-frame splice
        full = decode_with_splice(self.vae, latents / cfg.diffusion.scale_factor, refs, chunk_frames=frames)
        return full
