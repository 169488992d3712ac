"""ToonCrafter inference: a request of keyframes in, frames out.

`ToonCrafterPipeline.__call__` is the official `image_guided_synthesis`, generalised to N keyframes
by sampling one window per adjacent pair (keyframes.py; with `loop` also last -> first), all windows
in one batch:

1. plan the windows and the output frames, preprocess the keyframes (short side to the model size,
   centre crop, [-1, 1]), and draw the noise from one CPU `torch.Generator` seeded by the request,
   in the official order (posterior noise, x_T, then one normal per step)
2. encode the conditioning: pinned first/last latents, decoder references, text + image context
   (conditioning.py)
3. guided DDIM sampling: cond and uncond in one batched UNet call per step (denoising.py, sampling.py)
4. dual-reference decode with the official middle-frame splice (decoding.py), then pick the frames
5. with `frame_multiplier` m > 1, the same steps again on windows between every two adjacent output
   frames, in batches of `inbetween_batch`, putting m-1 of their frames between the two

Sketch guidance (sketching.py) adds the sketch encoder's residuals to the UNet in step 3, for the
window frames that become sketched output frames; without sketches, or at scale 0, nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from tooncrafter import keyframes as keyframe_plan
from tooncrafter.batching import UNetBatcher
from tooncrafter.conditioning import ConditionEncoder
from tooncrafter.cpu_allocator import give_back_free_memory, reuse_freed_memory
from tooncrafter.decoding import decode_latents
from tooncrafter.denoising import SketchGuidance, guided_denoiser, noise_schedule
from tooncrafter.generation import GenerationRequest, GenerationResult, ProgressCallback
from tooncrafter.keyframes import FrameSource
from tooncrafter.media.tensors import (
    frames_to_pixels,
    preprocess_keyframe,
    video_to_frames,
)
from tooncrafter.model.checkpoint import has_component, read_state_dict
from tooncrafter.model.config import ToonCrafterConfig, builtin_config, load_config
from tooncrafter.model.cpu_inference import pack_for_input, specialise_for_cpu
from tooncrafter.model.loader import ToonCrafterComponents, build_on_meta, load_components
from tooncrafter.model.mapped_pages import release_module_pages
from tooncrafter.model.onednn import slow_cpu_dtype_reason
from tooncrafter.model.page_cache import read_into_page_cache
from tooncrafter.placement import Placement, resolve_device, resolve_dtype
from tooncrafter.sampling import (
    DDIMStepOutput,
    NoiseFn,
    ddim_schedule,
    generator_noise,
    randn_tensor,
    sample_ddim,
)
from tooncrafter.sketching import LazySketchEncoder, prepare_sketches, window_sketches

logger = logging.getLogger(__name__)


INBETWEEN_BATCH = 4
"""In-between windows sampled together (`frame_multiplier`): bounds the pass's memory to about that of a
four-keyframe request whatever the clip's length."""
# Streams of derived seeds for the in-between pass (`_derived_generator`)
_WINDOW_STREAM, _POSTERIOR_STREAM = 1, 2


class _Progress:
    """The sampler's per-step callbacks as `on_step(step, total)`: step 1-based, counted across passes."""

    def __init__(self, on_step: ProgressCallback | None, total: int) -> None:
        self.on_step, self.total, self.done = on_step, total, 0

    def next_pass(self) -> Callable[[DDIMStepOutput], None] | None:
        if self.on_step is None:
            return None
        offset, on_step = self.done, self.on_step

        def callback(out: DDIMStepOutput) -> None:
            self.done = offset + out.index + 1
            on_step(self.done, self.total)

        return callback


def _batches(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _derived_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator of its own for item `index` of `stream`, seeded from the request's seed (numpy's
    SeedSequence mixes the three into well-separated seeds)."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(2, np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def _pack_for_guided_steps(unet: nn.Module, config: ToonCrafterConfig) -> None:
    """Pack the CPU UNet's convolutions at load for what a default request's steps give it (cond and uncond rows
    of one window at the configured size), instead of inside its first step."""
    twin = build_on_meta(config, ("unet",))["unet"]
    rows, frames, (h, w) = 2, config.num_frames, config.latent_size
    context_length = twin.text_context_len + config.resampler.num_queries * frames
    meta = torch.device("meta")
    pack_for_input(
        unet,
        twin,
        torch.empty(rows, config.unet.in_channels, frames, h, w, device=meta),
        torch.zeros(rows, dtype=torch.long, device=meta),
        torch.empty(rows, context_length, config.unet.context_dim, device=meta),
        torch.zeros(rows, dtype=torch.long, device=meta),
    )


class ToonCrafterPipeline:
    """A loaded ToonCrafter model: build once per process (`from_pretrained`), call once per request."""

    def __init__(
        self,
        components: ToonCrafterComponents,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        offload: bool = False,
        sketch_checkpoint: str | Path | None = None,
        inbetween_batch: int = INBETWEEN_BATCH,
    ) -> None:
        """`sketch_checkpoint`: the sketch encoder's weights (None: the hub's `sketch_encoder.ckpt`), read on the
        first request with sketches. `inbetween_batch`: in-between windows sampled together."""
        if inbetween_batch < 1:
            raise ValueError(f"inbetween_batch must be >= 1, got {inbetween_batch}")
        self.components = components
        self.config: ToonCrafterConfig = components.config
        self.placement = Placement(torch.device(device), dtype, offload)
        self.schedule = noise_schedule(components)
        self._encoder = ConditionEncoder(components, self.placement)
        self._unet = UNetBatcher(components.unet)  # the UNet, merging the calls of concurrent requests (batching.py)
        self.sketch_encoder = LazySketchEncoder(sketch_checkpoint, self.config.unet, self.placement)
        self.inbetween_batch = inbetween_batch

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
        sketch_checkpoint: str | Path | None = None,
    ) -> ToonCrafterPipeline:
        """Find the weights (path, directory or the Hugging Face hub), build on `meta`, load to device/dtype.

        `compile` wraps the UNet (the one network that runs every step) in `torch.compile`. The sketch encoder
        (`sketch_checkpoint`, else the hub's) is loaded only when a request first brings sketches.
        """
        from tooncrafter.weights import resolve_checkpoint, resolve_open_clip_weights

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        resolved = resolve_checkpoint(checkpoint, progress=progress)
        config = load_config(resolved.config_path) if resolved.config_path is not None else builtin_config()
        # the tensors stay memory-mapped: read the file now, in one sequential pass, not by page faults in the
        # first request (page_cache.py: the first mid step 31.8 s from a cold cache, 16.5 s warm)
        read_into_page_cache(resolved.weights_path)
        state = read_state_dict(resolved.weights_path)
        clip_states = None
        if require_clip and not (has_component(state, "text_encoder") and has_component(state, "image_encoder")):
            from tooncrafter.model.clip import open_clip_state_to_components

            logger.info("checkpoint has no CLIP towers: loading the OpenCLIP %s release weights", config.text_encoder.arch)
            clip_path = resolve_open_clip_weights(config.text_encoder.arch, config.text_encoder.version or "laion2b_s32b_b79k")
            read_into_page_cache(clip_path)
            clip_states = open_clip_state_to_components(read_state_dict(clip_path))
        load_device = torch.device("cpu") if offload else device
        components = load_components(config, state, device=load_device, dtype=dtype, clip_states=clip_states)
        if offload:
            components.unet.to(device)
        slow_reason = slow_cpu_dtype_reason(dtype) if device.type == "cpu" else None
        if slow_reason is not None:
            logger.warning("%s many times slower than float32 here; float32 (the CPU default) is the fast choice", slow_reason)
        if device.type == "cpu":
            # packed weights for the network of every step (not under torch.compile); the VAE's decoder convs
            # re-packed for each decode shape were slower (benchmarks/README.md)
            specialise_for_cpu(components.unet, weights="as_is" if compile else "packed")
            if not compile:
                _pack_for_guided_steps(components.unet, config)
            # read once or twice a request, and their pages given back after it: linears on oneDNN in place
            for module in (components.vae, components.resampler, components.text_encoder, components.image_encoder):
                specialise_for_cpu(module, weights="in_place")
        if compile:
            components.unet.compile(dynamic=False)
        give_back_free_memory()  # what conversion and packing left free on the CPU heap (cpu_allocator.py)
        return cls(components, device=device, dtype=dtype, offload=offload, sketch_checkpoint=sketch_checkpoint)

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
        step of every pass; an exception raised in it (e.g. `GenerationCancelled`) stops the request there."""
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
        # 1. plan (keyframe windows, in-between windows, where each output frame comes from), preprocess, noise
        num_keyframes = len(request.keyframes)
        plan = keyframe_plan.plan_clip(
            num_keyframes, self.num_frames, request.keyframe_lengths,
            keep_all=request.keep_all_frames, loop=request.loop, multiplier=request.frame_multiplier,
        )
        sketches = {}
        if request.uses_sketches:
            sketches = prepare_sketches(request.sketches, *self.pixel_size, plan.num_output_frames)
            self.sketch_encoder.get()  # loaded (or its absence reported) before any sampling
        batches = _batches(len(plan.inbetween_windows), self.inbetween_batch)
        progress = _Progress(on_step, request.steps * (1 + len(batches)))
        pixels = self._preprocess(request.keyframes)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        posterior_noise, x_T = self._draw_noise(plan.windows, num_keyframes, generator)

        # 2-4. the keyframe pass: conditioning, guided DDIM sampling, dual-reference decode of every window
        sketch = self.sketch_encoder.guidance(
            window_sketches(sketches, plan.sources, 0, range(len(plan.windows)), self.num_frames), request.sketch_scale
        )
        window_frames = self._sample_windows(
            pixels, plan.windows, request, posterior_noise, x_T.to(device),
            generator_noise(generator, device, torch.float32), sketch, progress,
        )
        first = np.stack([window_frames[window][index] for window, index in plan.picks])
        if not plan.inbetween_windows:
            return GenerationResult(frames=first, seed=request.seed)

        # 5. the in-between pass: one window between every two adjacent frames of the first pass, in batches
        made = {(0, window, index): frames[index] for window, frames in enumerate(window_frames) for index in range(len(frames))}
        for batch in batches:
            made.update(self._inbetween_batch(first, plan, batch, request, sketches, progress))
        return GenerationResult(frames=np.stack([made[source] for source in plan.sources]), seed=request.seed)

    def _sample_windows(
        self,
        pixels: torch.Tensor,
        windows: Sequence[tuple[int, int]],
        request: GenerationRequest,
        posterior_noise: torch.Tensor,
        x_T: torch.Tensor,
        noise_fn: NoiseFn,
        sketch: SketchGuidance | None,
        progress: _Progress,
    ) -> list[np.ndarray]:
        """Windows over `pixels` `[K, 3, H, W]` -> each window's uint8 frames `[T, H, W, 3]` (steps 2-4)."""
        videos = self.sample_video(
            pixels, windows, prompt=request.prompt, steps=request.steps, cfg_scale=request.cfg_scale, eta=request.eta,
            motion_steps=request.motion_steps, posterior_noise=posterior_noise, x_T=x_T, noise_fn=noise_fn,
            sketch=sketch, callback=progress.next_pass(),
        )
        return [video_to_frames(video) for video in videos.cpu()]

    @torch.no_grad()
    def sample_video(
        self,
        pixels: torch.Tensor,
        windows: Sequence[tuple[int, int]],
        *,
        prompt: str,
        steps: int,
        cfg_scale: float,
        eta: float,
        motion_steps: int,
        posterior_noise: torch.Tensor,
        x_T: torch.Tensor,
        noise_fn: NoiseFn,
        sketch: SketchGuidance | None = None,
        callback: Callable[[DDIMStepOutput], None] | None = None,
    ) -> torch.Tensor:
        """Steps 2-4 of the method on given noise: preprocessed keyframes `[K, 3, H, W]` and their windows ->
        float32 videos `[B, 3, T, H, W]` (not clamped). `__call__` draws the noise from the request's seed; the
        side-by-side benchmark feeds the official code's own noise through here."""
        device = self.placement.device
        with reuse_freed_memory() if device.type == "cpu" else contextlib.nullcontext():
            # 2. encode the conditioning
            cond = self._encoder(
                pixels, windows, prompt=prompt, cfg_scale=cfg_scale, motion_steps=motion_steps,
                posterior_noise=posterior_noise,
            )
            if device.type == "cpu":  # nothing reads CLIP, the Resampler or the VAE encoder again in this request
                release_module_pages(*self._conditioning_modules())
            # 3. guided DDIM sampling
            plan = ddim_schedule(self.schedule, steps, eta)
            denoise = guided_denoiser(self._unet, cond, cfg_scale, self.placement.dtype, sketch)
            latents = sample_ddim(denoise, x_T.to(device), plan, noise_fn, callback=callback)
            # 4. decode each window against its two references; the UNet's mapped fp32 pages are not read during
            # the decode: back to the page cache with them (CPU peak memory), unless a batch's requests still sample
            if device.type == "cpu" and self._unet.members <= 1:
                release_module_pages(self.components.unet)
                if self.placement.dtype != torch.float32:
                    # the step activations' freed blocks are too small for the decoder's: their pages go back before
                    # it grows the heap (mid bf16 request peak 5.55 -> 5.29 GB; fp32 peaks while sampling, on the
                    # mapped weights, so there it would only cost the decode fresh faults: cpu_allocator.py)
                    give_back_free_memory()
            return decode_latents(
                self.components.vae, latents, cond.ref_context,
                scale_factor=self.config.diffusion.scale_factor, placement=self.placement,
            )

    def _conditioning_modules(self) -> list[nn.Module]:
        """The components step 2 reads and steps 3-4 do not: their mapped pages can go back during sampling."""
        c = self.components
        return [m for m in (c.text_encoder, c.image_encoder, c.resampler, c.vae.encoder, c.vae.quant_conv) if m is not None]

    def _inbetween_batch(
        self,
        first: np.ndarray,
        plan: keyframe_plan.ClipPlan,
        batch: range,
        request: GenerationRequest,
        sketches: dict[int, torch.Tensor],
        progress: _Progress,
    ) -> dict[FrameSource, np.ndarray]:
        """In-between windows `batch` (pairs of first-pass frames `first` `[F, H, W, 3]`) -> their frames.

        Each window draws its noise from its own generator (seeded from the request's seed and its index) and
        each frame its posterior noise likewise, so a window's result does not depend on how they are batched.
        """
        device = self.placement.device
        pairs = [plan.inbetween_windows[k] for k in batch]
        frames = sorted({f for pair in pairs for f in pair})
        local = {f: i for i, f in enumerate(frames)}
        channels, (h, w) = self.config.diffusion.channels, self.config.latent_size
        posterior_noise = torch.cat([
            randn_tensor((1, channels, h, w), _derived_generator(request.seed, _POSTERIOR_STREAM, f), "cpu", torch.float32)
            for f in frames
        ])
        generators = [_derived_generator(request.seed, _WINDOW_STREAM, k) for k in batch]
        x_T = torch.cat([randn_tensor((1, channels, self.num_frames, h, w), g, device, torch.float32) for g in generators])

        def noise_fn(step_index: int, shape: tuple[int, ...]) -> torch.Tensor:
            return torch.cat([randn_tensor((1, *shape[1:]), g, device, torch.float32) for g in generators])

        sketch = self.sketch_encoder.guidance(
            window_sketches(sketches, plan.sources, 1, batch, self.num_frames), request.sketch_scale
        )
        window_frames = self._sample_windows(
            frames_to_pixels(first[frames]), [(local[a], local[b]) for a, b in pairs], request,
            posterior_noise, x_T, noise_fn, sketch, progress,
        )
        return {
            FrameSource(1, k, index): frames_k[index]
            for k, frames_k in zip(batch, window_frames)
            for index in keyframe_plan.inbetween_frames(self.num_frames, request.frame_multiplier)
        }

    def _preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL keyframes -> `[K, 3, H, W]` in [-1, 1] at the model size (the official inference transform)."""
        height, width = self.pixel_size
        return torch.stack([preprocess_keyframe(image, height, width) for image in images])

    def _draw_noise(
        self, windows: Sequence[tuple[int, int]], num_keyframes: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior noise `[K, C, h, w]` and x_T `[B, C, T, h, w]`, drawn as the official batch of B windows would.

        The official code draws posterior noise for every frame of every window (`[B*T, C, h, w]`); keyframe k
        takes that of the first frame of the first window starting with it, else of the last frame of the
        first window ending with it (in a chain: keyframe i takes window i's first frame, the last keyframe
        the last window's last frame).
        """
        frames, (h, w), channels = self.num_frames, self.config.latent_size, self.config.diffusion.channels
        drawn = randn_tensor((len(windows) * frames, channels, h, w), generator, "cpu", torch.float32)
        rows = []
        for k in range(num_keyframes):
            starts = [i for i, (a, _) in enumerate(windows) if a == k]
            rows.append(starts[0] * frames if starts else next(i for i, (_, b) in enumerate(windows) if b == k) * frames + frames - 1)
        x_T = randn_tensor((len(windows), channels, frames, h, w), generator, "cpu", torch.float32)
        return drawn[rows], x_T
