"""ToonCrafter inference: a request of keyframes in, frames out.

`ToonCrafterPipeline.__call__` is the official `image_guided_synthesis`, generalised to N keyframes
by sampling one window per adjacent pair (keyframes.py), all windows in one batch:

1. plan the windows and the output frames, preprocess the keyframes (short side to the model size,
   centre crop, [-1, 1]), and draw the noise from one CPU `torch.Generator` seeded by the request,
   in the official order (posterior noise, x_T, then one normal per step)
2. encode the conditioning: pinned first/last latents, decoder references, text + image context
   (conditioning.py)
3. guided DDIM sampling: cond and uncond in one batched UNet call per step (denoising.py, sampling.py)
4. dual-reference decode with the official middle-frame splice (decoding.py), then pick the frames
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from tooncrafter import keyframes as keyframe_plan
from tooncrafter.batching import UNetBatcher
from tooncrafter.conditioning import ConditionEncoder
from tooncrafter.cpu_allocator import reuse_freed_memory
from tooncrafter.decoding import decode_latents
from tooncrafter.denoising import guided_denoiser, noise_schedule
from tooncrafter.generation import GenerationRequest, GenerationResult, ProgressCallback
from tooncrafter.media.tensors import preprocess_keyframe, video_to_frames
from tooncrafter.model.checkpoint import has_component, read_state_dict
from tooncrafter.model.config import ToonCrafterConfig, builtin_config, load_config
from tooncrafter.model.cpu_prepack import prepack_convolutions
from tooncrafter.model.gemm_conv import use_gemm_convolutions
from tooncrafter.model.loader import ToonCrafterComponents, load_components
from tooncrafter.model.mapped_pages import release_module_pages
from tooncrafter.placement import Placement, resolve_device, resolve_dtype
from tooncrafter.sampling import DDIMStepOutput, ddim_schedule, generator_noise, randn_tensor, sample_ddim

logger = logging.getLogger(__name__)


def _progress(on_step: ProgressCallback | None) -> Callable[[DDIMStepOutput], None] | None:
    """The sampler's per-step callback as `on_step(step, total)`, step 1-based."""
    if on_step is None:
        return None
    return lambda out: on_step(out.index + 1, out.total)


class ToonCrafterPipeline:
    """A loaded ToonCrafter model: build once per process (`from_pretrained`), call once per request."""

    def __init__(
        self,
        components: ToonCrafterComponents,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        offload: bool = False,
    ) -> None:
        self.components = components
        self.config: ToonCrafterConfig = components.config
        self.placement = Placement(torch.device(device), dtype, offload)
        self.schedule = noise_schedule(components)
        self._encoder = ConditionEncoder(components, self.placement)
        self._unet = UNetBatcher(components.unet)  # the UNet, merging the calls of concurrent requests (batching.py)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        offload: bool = False,
        compile: bool = False,
        progress: bool = True,
        require_clip: bool = True,
    ) -> ToonCrafterPipeline:
        """Find the weights (path, directory or the Hugging Face hub), build on `meta`, load to device/dtype.

        `compile` wraps the UNet (the one network that runs every step) in `torch.compile`.
        """
        from tooncrafter.weights import resolve_checkpoint, resolve_open_clip_weights

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        resolved = resolve_checkpoint(checkpoint, progress=progress)
        config = load_config(resolved.config_path) if resolved.config_path is not None else builtin_config()
        state = read_state_dict(resolved.weights_path)
        clip_states = None
        if require_clip and not (has_component(state, "text_encoder") and has_component(state, "image_encoder")):
            from tooncrafter.model.clip import open_clip_state_to_components

            logger.info("checkpoint has no CLIP towers: loading the OpenCLIP %s release weights", config.text_encoder.arch)
            clip_path = resolve_open_clip_weights(config.text_encoder.arch, config.text_encoder.version or "laion2b_s32b_b79k")
            clip_states = open_clip_state_to_components(read_state_dict(clip_path))
        load_device = torch.device("cpu") if offload else device
        components = load_components(config, state, device=load_device, dtype=dtype, clip_states=clip_states)
        if offload:
            components.unet.to(device)
        if device.type == "cpu" and not compile:
            use_gemm_convolutions(components.unet)  # the deep levels' tiny maps as one GEMM (gemm_conv.py)
            if dtype != torch.float32:
                prepack_convolutions(components.unet)  # oneDNN-packed weights for the other bf16 convs (cpu_prepack.py)
        if compile:
            components.unet.compile(dynamic=False)
        return cls(components, device=device, dtype=dtype, offload=offload)

    @property
    def num_frames(self) -> int:
        """T, the frames of one window (and of the default output)."""
        return self.config.num_frames

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(H, W) of the frames made."""
        return self.config.pixel_size

    @torch.no_grad()
    def __call__(self, request: GenerationRequest, *, on_step: ProgressCallback | None = None) -> GenerationResult:
        """Keyframes + options -> uint8 frames `[F, H, W, 3]`. `on_step(step, total)` follows every denoising
        step; an exception raised in it (e.g. `GenerationCancelled`) stops the request there."""
        device = self.placement.device
        with reuse_freed_memory() if device.type == "cpu" else contextlib.nullcontext():
            return self._generate(request, on_step)

    def join_batch(self, count: int) -> None:
        """`count` concurrent calls to come form one batch (`generate_batch`, or a worker running several jobs):
        their UNet calls merge. Each caller calls `leave_batch()` once its call is over or will not be made."""
        self._unet.join(count)

    def leave_batch(self) -> None:
        self._unet.leave()

    def generate_batch(
        self, requests: Sequence[GenerationRequest], *, on_step: Sequence[ProgressCallback | None] | None = None
    ) -> list[GenerationResult | BaseException]:
        """Run several requests at once, their UNet calls merged into one per step (`batching.py`).

        Each request keeps its own seed, conditioning, decode and `on_step` (an exception raised there, e.g.
        `GenerationCancelled`, stops that request only). Returns, in order, each request's result or the
        exception that ended it. Requests with the same `steps` run in lockstep and merge every call.
        """
        callbacks = list(on_step) if on_step is not None else [None] * len(requests)
        if len(callbacks) != len(requests):
            raise ValueError(f"generate_batch: {len(requests)} requests but {len(callbacks)} callbacks")
        outcomes: list[GenerationResult | BaseException] = [RuntimeError("not run")] * len(requests)

        def run(index: int) -> None:
            try:
                outcomes[index] = self(requests[index], on_step=callbacks[index])
            except BaseException as exc:  # handed back to the caller, in order
                outcomes[index] = exc
            finally:
                self.leave_batch()

        self.join_batch(len(requests))  # all members before any starts: no request runs a step alone
        threads = [threading.Thread(target=run, args=(i,), name=f"generate-{i}") for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return outcomes

    def _generate(self, request: GenerationRequest, on_step: ProgressCallback | None) -> GenerationResult:
        device = self.placement.device
        # 1. plan, preprocess, noise
        num_keyframes = len(request.keyframes)
        windows = keyframe_plan.plan_windows(num_keyframes)
        picks = keyframe_plan.frame_picks(
            num_keyframes, self.num_frames, request.keyframe_lengths, keep_all=request.keep_all_frames
        )
        pixels = self._preprocess(request.keyframes)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        posterior_noise, x_T = self._draw_noise(len(windows), generator)

        # 2. encode the conditioning
        cond = self._encoder(
            pixels, windows, prompt=request.prompt, cfg_scale=request.cfg_scale,
            motion_steps=request.motion_steps, posterior_noise=posterior_noise,
        )

        # 3. guided DDIM sampling
        plan = ddim_schedule(self.schedule, request.steps, request.eta)
        denoise = guided_denoiser(self._unet, cond, request.cfg_scale, self.placement.dtype)
        latents = sample_ddim(
            denoise, x_T.to(device), plan, generator_noise(generator, device, torch.float32), callback=_progress(on_step)
        )

        # 4. decode each window against its two references, then pick the output frames; the UNet's mapped
        # fp32 pages are not read again in this request: back to the page cache with them (CPU peak memory)
        if device.type == "cpu" and self._unet.members <= 1:  # (not while other requests of a batch still sample)
            release_module_pages(self.components.unet)
        videos = decode_latents(
            self.components.vae, latents, cond.ref_context,
            scale_factor=self.config.diffusion.scale_factor, placement=self.placement,
        )
        window_frames = [video_to_frames(video) for video in videos.cpu()]
        frames = np.stack([window_frames[window][index] for window, index in picks])
        return GenerationResult(frames=frames, seed=request.seed)

    def _preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL keyframes -> `[K, 3, H, W]` in [-1, 1] at the model size (the official inference transform)."""
        height, width = self.pixel_size
        return torch.stack([preprocess_keyframe(image, height, width) for image in images])

    def _draw_noise(self, num_windows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior noise `[K, C, h, w]` and x_T `[B, C, T, h, w]`, drawn as the official batch of B windows would.

        The official code draws posterior noise for every frame of every window (`[B*T, C, h, w]`); keyframe i
        takes window i's first frame, the last keyframe the last window's last frame.
        """
        frames, (h, w), channels = self.num_frames, self.config.latent_size, self.config.diffusion.channels
        drawn = randn_tensor((num_windows * frames, channels, h, w), generator, "cpu", torch.float32)
        posterior_noise = drawn[[i * frames for i in range(num_windows)] + [num_windows * frames - 1]]
        x_T = randn_tensor((num_windows, channels, frames, h, w), generator, "cpu", torch.float32)
        return posterior_noise, x_T
