"""ToonCrafter inference: keyframes in, frames out.

`ToonCrafterPipeline.interpolate` is the official `image_guided_synthesis` for a batch of keyframe
pairs ("windows"), read top to bottom:

1. preprocess keyframes (short side to the model size, centre crop, [-1, 1])
2. encode the DISTINCT keyframes once (the VAE encoder is per frame), sample their posteriors,
   keep the encoder hidden states as the decoder's two references
3. text and image context, cond and uncond (empty prompt, all-zero image), cached where constant
4. pin the first and last latents of each window (the concat condition)
5. guided DDIM loop: cond and uncond in ONE batched UNet call per step
6. dual-reference decode, with the official middle-frame splice

`generate` wraps it for the service and the CLI (the `Generator` protocol of generation.py): one
`torch.Generator` per request, noise drawn in the official order (posterior noise, x_T, one normal
per step), and the multi-keyframe frame plan of keyframes.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from tooncrafter import keyframes as keyframe_plan
from tooncrafter.generation import (
    CancelCheck,
    GenerationRequest,
    GenerationResult,
    ProgressCallback,
)
from tooncrafter.media import preprocess_keyframe, video_to_frames
from tooncrafter.model.checkpoint import has_component, read_state_dict
from tooncrafter.model.config import ToonCrafterConfig, builtin_config, load_config
from tooncrafter.model.cpu_prepack import prepack_convolutions
from tooncrafter.model.loader import ToonCrafterComponents, load_components
from tooncrafter.sampling import (
    DDIMStepOutput,
    NoiseFn,
    NoiseSchedule,
    ddim_schedule,
    generator_noise,
    guide,
    randn_tensor,
    replay_noise,
    sample_ddim,
)

logger = logging.getLogger(__name__)

GUIDANCE_RESCALE = 0.7  # the official sampler's `guidance_rescale`
TEXT_CACHE_SIZE = 32  # prompts whose embeddings a pipeline keeps


@dataclass(frozen=True)
class GuidanceRecord:
    """Per-step internals of the guided denoiser, for the parity tool."""

    t: int
    v_cond: torch.Tensor
    v_uncond: torch.Tensor | None
    v_cfg: torch.Tensor
    v_guided: torch.Tensor


@dataclass
class Conditioning:
    """Everything the sampler and the decoder need for a batch of windows `[B, ...]`."""

    c_concat: torch.Tensor  # [B, C, T, h, w], zero except the first and last frame
    context_cond: torch.Tensor  # [B, 77 + tokens, D]
    context_uncond: torch.Tensor | None  # None when cfg_scale == 1
    ref_context: list[torch.Tensor]  # 5 x [B, C_i, 2, h_i, w_i]
    fs: torch.Tensor  # [B] int64


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}") from None


class ToonCrafterPipeline:
    """A loaded ToonCrafter model; build once per process, call `generate` per request."""

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
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload = offload
        self.schedule = (
            NoiseSchedule.from_buffers(components.schedule_buffers)
            if "alphas_cumprod" in components.schedule_buffers
            else NoiseSchedule.from_config(self.config.diffusion)
        )
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._zero_image_tokens: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------------

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
    ) -> "ToonCrafterPipeline":
        """Find the weights (path, directory or the Hugging Face hub), build on `meta`, load to device/dtype."""
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
        elif device.type == "cpu" and dtype != torch.float32 and not compile:
            prepack_convolutions(components.unet)  # oneDNN-packed weights: the UNet's bf16 convs (cpu_prepack.py)
        pipeline = cls(components, device=device, dtype=dtype, offload=offload)
        if compile:
            pipeline.compile()
        return pipeline

    def compile(self) -> None:
        """Opt-in `torch.compile` of the UNet (the one network that runs every step)."""
        self.components.unet.forward = torch.compile(self.components.unet.forward, dynamic=False)  # type: ignore[method-assign]

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    @property
    def pixel_size(self) -> tuple[int, int]:
        return self.config.pixel_size

    @contextlib.contextmanager
    def _resident(self, module: torch.nn.Module | None) -> Iterator[None]:
        """With `offload`, move a component to the compute device only while it is used."""
        if module is None or not self.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------
    # 1. preprocess
    # ------------------------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL keyframes -> `[K, 3, H, W]` in [-1, 1] at the model size (official inference transform)."""
        height, width = self.pixel_size
        return torch.stack([preprocess_keyframe(image, height, width) for image in images])

    # ------------------------------------------------------------------------------------------------
    # 2. encode distinct keyframes
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_keyframes(self, pixels: torch.Tensor, posterior_noise: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Scaled latents `[K, C, h, w]` (posterior SAMPLED with the given noise, as officially) and the
        encoder hidden states (5 x `[K, C_i, h_i, w_i]`) of K distinct keyframes."""
        vae = self.components.vae
        with self._resident(vae):
            out = vae.encode(pixels.to(self.device, self.dtype))
        z = out.sample(posterior_noise.to(self.device, out.mean.dtype))
        latents = (self.config.diffusion.scale_factor * z).float()
        return latents, list(out.hidden_states)

    # ------------------------------------------------------------------------------------------------
    # 3. text / image context
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """`[B, 77, D]` per prompt. Each prompt is encoded once and kept in a small LRU cache owned by the
        pipeline (the empty prompt of the unconditional branch is needed by every request)."""
        encoder = self.components.text_encoder
        if encoder is None:
            raise RuntimeError("this checkpoint has no CLIP text encoder: pass text embeddings explicitly")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with self._resident(encoder):
                embedded = encoder(encoder.tokenize(missing).to(self.device)).to(self.dtype)
            for prompt, emb in zip(missing, embedded):
                self._text_cache[prompt] = emb
        result = torch.stack([self._text_cache[p] for p in prompts])
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return result

    @torch.no_grad()
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """OpenCLIP image tokens `[B, 257, width]` of images in [-1, 1]."""
        encoder = self.components.image_encoder
        if encoder is None:
            raise RuntimeError("this checkpoint has no CLIP image encoder: pass image tokens explicitly")
        with self._resident(encoder):
            return encoder(pixels.to(self.device, self.dtype))

    @torch.no_grad()
    def zero_image_tokens(self) -> torch.Tensor:
        """Tokens of the all-zero image (the unconditional image branch), computed once."""
        if self._zero_image_tokens is None:
            height, width = self.pixel_size
            zeros = torch.zeros(1, 3, height, width, device=self.device, dtype=self.dtype)
            self._zero_image_tokens = self.image_tokens(zeros)
        return self._zero_image_tokens

    @torch.no_grad()
    def image_context(self, tokens: torch.Tensor) -> torch.Tensor:
        """Resampler: CLIP tokens -> `[B, queries * T, D]` image context."""
        resampler = self.components.resampler
        return resampler(tokens.to(self.device, self.dtype))

    @staticmethod
    def context(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The UNet context: text tokens then image tokens along the sequence."""
        return torch.cat([text, image.to(text.dtype)], dim=1)

    # ------------------------------------------------------------------------------------------------
    # 4. concat condition
    # ------------------------------------------------------------------------------------------------

    def concat_condition(self, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """`[B, C, T, h, w]` zeros with the first frame = `first` `[B,C,h,w]` and the last = `last`."""
        b, c, h, w = first.shape
        c_concat = first.new_zeros(b, c, self.num_frames, h, w)
        c_concat[:, :, 0] = first
        c_concat[:, :, -1] = last
        return c_concat

    # ------------------------------------------------------------------------------------------------
    # 5. guided denoiser
    # ------------------------------------------------------------------------------------------------

    def denoiser(
        self,
        cond: Conditioning,
        cfg_scale: float,
        *,
        record: Callable[[GuidanceRecord], None] | None = None,
    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """`denoise(x, t) -> v_guided`, cond and uncond batched into one UNet call."""
        unet = self.components.unet
        use_cfg = cfg_scale != 1.0 and cond.context_uncond is not None
        if use_cfg:
            c_concat = torch.cat([cond.c_concat, cond.c_concat])
            context = torch.cat([cond.context_cond, cond.context_uncond]).to(self.dtype)
            fs = torch.cat([cond.fs, cond.fs])
        else:
            c_concat, context, fs = cond.c_concat, cond.context_cond.to(self.dtype), cond.fs
        # built once: the UNet input [x | c_concat] (cond and uncond rows share x) and the timestep vector;
        # each step only writes x and t into them
        batch, channels = cond.c_concat.shape[:2]
        unet_in = torch.cat([torch.empty_like(c_concat), c_concat], dim=1).to(self.dtype)
        x_slots = unet_in[:, :channels].unflatten(0, (-1, batch))  # [1 or 2, B, C, T, h, w]
        timesteps = torch.empty(unet_in.shape[0], device=unet_in.device, dtype=torch.long)

        def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
            x_slots.copy_(x.unsqueeze(0))
            timesteps.fill_(t)
            v = unet(unet_in, timesteps, context, fs).float()
            v_cond, v_uncond = v.chunk(2) if use_cfg else (v, None)
            v_cfg, v_guided = guide(v_cond, v_uncond, cfg_scale if use_cfg else 1.0, GUIDANCE_RESCALE)
            if record is not None:
                record(GuidanceRecord(t=t, v_cond=v_cond, v_uncond=v_uncond, v_cfg=v_cfg, v_guided=v_guided))
            return v_guided

        return denoise

    # ------------------------------------------------------------------------------------------------
    # 6. decode
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, ref_context: Sequence[torch.Tensor]) -> torch.Tensor:
        """Scaled latents `[B, C, T, h, w]` -> video `[B, 3, T, H, W]` (not clamped), with the official
        middle-frame splice (`decode_with_splice`)."""
        vae = self.components.vae
        z = (latents / self.config.diffusion.scale_factor).to(self.device, self.dtype)
        refs = [r.to(self.device, self.dtype) for r in ref_context]
        with self._resident(vae):
            full = decode_with_splice(vae, z, refs, chunk_frames=self.num_frames)
        return full.float()

    # ------------------------------------------------------------------------------------------------
    # the method
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def condition(
        self,
        keyframe_pixels: torch.Tensor,
        windows: Sequence[tuple[int, int]],
        *,
        prompt: str,
        cfg_scale: float,
        motion_steps: int,
        posterior_noise: torch.Tensor,
        text_embeddings: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        clip_image_tokens: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        record: dict[str, torch.Tensor] | None = None,
    ) -> Conditioning:
        """Steps 2-4 for `windows` (pairs of indices into `keyframe_pixels` `[K, 3, H, W]`).

        `text_embeddings` / `clip_image_tokens` (cond `[B or 1, ...]`, uncond) replace the CLIP towers
        when given (parity from a checkpoint without them). `posterior_noise` is `[K, C, h, w]`.
        """
        batch = len(windows)
        first = [a for a, _ in windows]
        last = [b for _, b in windows]
        use_cfg = cfg_scale != 1.0

        # 2. encode each distinct keyframe once
        latents, hidden = self.encode_keyframes(keyframe_pixels, posterior_noise)
        c_concat = self.concat_condition(latents[first], latents[last])
        ref_context = [torch.stack([h[first], h[last]], dim=2) for h in hidden]

        # 3. context: text tokens then Resampler tokens of the window's first keyframe (uncond: "" and a zero image)
        if text_embeddings is None:
            text_cond = self.text_embeddings([prompt]).expand(batch, -1, -1)
            text_uncond = self.text_embeddings([""]).expand(batch, -1, -1) if use_cfg else None
        else:
            text_cond = text_embeddings[0].to(self.device, self.dtype).expand(batch, -1, -1)
            text_uncond = text_embeddings[1].to(self.device, self.dtype).expand(batch, -1, -1) if use_cfg else None
        if clip_image_tokens is None:
            distinct_first = sorted(set(first))
            tokens = self.image_tokens(keyframe_pixels[distinct_first])
            tokens_cond = tokens[[distinct_first.index(i) for i in first]]
            tokens_uncond = self.zero_image_tokens().expand(batch, -1, -1) if use_cfg else None
        else:
            tokens_cond = clip_image_tokens[0].to(self.device, self.dtype).expand(batch, -1, -1)
            tokens_uncond = clip_image_tokens[1].to(self.device, self.dtype).expand(batch, -1, -1) if use_cfg else None
        image_cond = self.image_context(tokens_cond)
        image_uncond = self.image_context(tokens_uncond) if tokens_uncond is not None else None
        context_cond = self.context(text_cond, image_cond)
        context_uncond = self.context(text_uncond, image_uncond) if use_cfg else None

        if record is not None:
            record.update(
                z_keyframes=latents, c_concat=c_concat, text_emb_cond=text_cond, resampler_out_cond=image_cond,
                context_cond=context_cond,
            )
            if use_cfg:
                record.update(text_emb_uncond=text_uncond, resampler_out_uncond=image_uncond, context_uncond=context_uncond)
        fs = torch.full((batch,), motion_steps, device=self.device, dtype=torch.long)
        return Conditioning(c_concat=c_concat, context_cond=context_cond, context_uncond=context_uncond, ref_context=ref_context, fs=fs)

    @torch.no_grad()
    def interpolate(
        self,
        keyframe_pixels: torch.Tensor,
        *,
        prompt: str = "",
        steps: int = 50,
        cfg_scale: float = 7.5,
        eta: float = 1.0,
        motion_steps: int = 10,
        generator: torch.Generator | None = None,
        posterior_noise: torch.Tensor | None = None,
        x_T: torch.Tensor | None = None,
        step_noise: Sequence[torch.Tensor] | None = None,
        text_embeddings: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        clip_image_tokens: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        on_step: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        step_callback: Callable[[DDIMStepOutput], None] | None = None,
        guidance_callback: Callable[[GuidanceRecord], None] | None = None,
        record: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """K >= 2 preprocessed keyframes `[K, 3, H, W]` -> one video per adjacent pair `[K-1, 3, T, H, W]`.

        Noise comes from `generator` in the official order (posterior noise for K-1 windows of T frames,
        then x_T, then one normal per step) unless given explicitly (fixture replay).
        """
        num_keyframes = keyframe_pixels.shape[0]
        if num_keyframes < 2:
            raise ValueError(f"need at least 2 keyframes, got {num_keyframes}")
        windows = keyframe_plan.plan_windows(num_keyframes)
        batch, frames = len(windows), self.num_frames
        h, w = self.config.latent_size
        channels = self.config.diffusion.channels
        if generator is None and (posterior_noise is None or x_T is None or (step_noise is None and eta > 0)):
            generator = torch.Generator("cpu").manual_seed(0)

        # posterior noise as the official batch would draw it ([B*T, C, h, w]); keyframe i takes window i's
        # first frame, the last keyframe the last window's last frame
        if posterior_noise is None:
            drawn = randn_tensor((batch * frames, channels, h, w), generator, "cpu", torch.float32)
            picks = [i * frames for i in range(batch)] + [batch * frames - 1]
            posterior_noise = drawn[picks]
        if x_T is None:
            x_T = randn_tensor((batch, channels, frames, h, w), generator, "cpu", torch.float32)
        cond = self.condition(
            keyframe_pixels, windows, prompt=prompt, cfg_scale=cfg_scale, motion_steps=motion_steps,
            posterior_noise=posterior_noise, text_embeddings=text_embeddings, clip_image_tokens=clip_image_tokens,
            record=record,
        )

        # 5. guided DDIM
        plan = ddim_schedule(self.schedule, steps, eta)
        noise_fn: NoiseFn = (
            replay_noise([n.to(self.device) for n in step_noise])
            if step_noise is not None
            else generator_noise(generator, self.device, torch.float32)
        )
        denoise = self.denoiser(cond, cfg_scale, record=guidance_callback)
        latents = sample_ddim(
            denoise, x_T.to(self.device, torch.float32), plan, noise_fn,
            on_step=on_step, should_cancel=should_cancel, callback=step_callback,
        )
        if record is not None:
            record["latents"] = latents

        # 6. decode against each window's two references
        return self.decode(latents, cond.ref_context)

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_step: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        """The `Generator` protocol: decoded keyframes + options -> uint8 frames `[F, H, W, 3]`."""
        num_keyframes = len(request.keyframes)
        if request.keyframe_lengths is not None:
            keyframe_plan.validate_keyframe_lengths(request.keyframe_lengths, num_keyframes, self.num_frames)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        pixels = self.preprocess(request.keyframes)
        videos = self.interpolate(
            pixels,
            prompt=request.prompt,
            steps=request.steps,
            cfg_scale=request.cfg_scale,
            eta=request.eta,
            motion_steps=request.motion_steps,
            generator=generator,
            on_step=on_step,
            should_cancel=should_cancel,
        )
        window_frames = [video_to_frames(v) for v in videos.cpu()]
        picks = keyframe_plan.frame_picks(
            num_keyframes, self.num_frames, request.keyframe_lengths, keep_all=request.keep_all_frames
        )
        frames = np.stack([window_frames[window][index] for window, index in picks])
        return GenerationResult(frames=frames, seed=request.seed)
