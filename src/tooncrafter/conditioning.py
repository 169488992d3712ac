"""Step 1 of the method: keyframes and prompt -> what the sampler and the decoder are conditioned on.

For a batch of windows (pairs of keyframe indices), as the official `image_guided_synthesis`:
* the DISTINCT keyframes are encoded once (the VAE encoder is per frame), their posteriors sampled
  with the given noise; the window's first and last latents are pinned in an otherwise zero
  `c_concat`, and the encoder hidden states of the two keyframes are the decoder's references;
* the context is the prompt's text tokens then the Resampler tokens of the window's first keyframe;
  the unconditional branch (only when cfg_scale != 1) is the empty prompt and the all-zero image;
* `fs` is the frame-stride condition (`motion_steps`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from tooncrafter.model.loader import ToonCrafterComponents
from tooncrafter.placement import Placement

TEXT_CACHE_SIZE = 32  # prompts whose embeddings an encoder keeps

Pair = tuple[torch.Tensor, "torch.Tensor | None"]
"""A (cond, uncond) pair of `[B, ...]` tensors; uncond is None without guidance (cfg_scale == 1)."""


@dataclass
class Conditioning:
    """Everything the sampler and the decoder need for a batch of B windows, and the tensors it was made from."""

    c_concat: torch.Tensor  # [B, C, T, h, w], zero except the first and last frame
    context_cond: torch.Tensor  # [B, text + image tokens, D]
    context_uncond: torch.Tensor | None  # None when cfg_scale == 1
    ref_context: list[torch.Tensor]  # 5 x [B, C_i, 2, h_i, w_i]
    fs: torch.Tensor  # [B] int64
    keyframe_latents: torch.Tensor  # [K, C, h, w], scaled
    text: Pair  # [B, 77, D]
    image: Pair  # Resampler output [B, queries * T, D]


def concat_condition(first: torch.Tensor, last: torch.Tensor, num_frames: int) -> torch.Tensor:
    """`[B, C, T, h, w]` zeros with frame 0 = `first` `[B, C, h, w]` and frame T-1 = `last`."""
    b, c, h, w = first.shape
    c_concat = first.new_zeros(b, c, num_frames, h, w)
    c_concat[:, :, 0] = first
    c_concat[:, :, -1] = last
    return c_concat


class ConditionEncoder:
    """The VAE encoder, the CLIP towers and the Resampler, with the embeddings worth keeping cached."""

    def __init__(self, components: ToonCrafterComponents, placement: Placement) -> None:
        self.components = components
        self.placement = placement
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._zero_image_tokens: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(
        self,
        pixels: torch.Tensor,
        windows: Sequence[tuple[int, int]],
        *,
        prompt: str,
        cfg_scale: float,
        motion_steps: int,
        posterior_noise: torch.Tensor,
    ) -> Conditioning:
        """`windows` index into the preprocessed keyframes `pixels` `[K, 3, H, W]`; `posterior_noise` is `[K, C, h, w]`."""
        guided = cfg_scale != 1.0
        latents, refs = self.encode_keyframes(pixels, posterior_noise)
        text = self.text_context(prompt, len(windows), guided)
        tokens = self.window_image_tokens(pixels, windows, guided)
        return self.assemble(latents, refs, windows, text, tokens, motion_steps)

    # -- the pieces (the parity tool calls them with a fixture's tensors) --------------------------------

    @torch.no_grad()
    def encode_keyframes(self, pixels: torch.Tensor, posterior_noise: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Scaled latents `[K, C, h, w]` (posterior SAMPLED with the given noise, as officially) and the encoder
        hidden states (5 x `[K, C_i, h_i, w_i]`) of K distinct keyframes."""
        vae, placement = self.components.vae, self.placement
        with placement.resident(vae):
            out = vae.encode(pixels.to(placement.device, placement.dtype))
        z = out.sample(posterior_noise.to(placement.device, out.mean.dtype))
        return (self.components.config.diffusion.scale_factor * z).float(), list(out.hidden_states)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """`[B, 77, D]` per prompt. Each prompt is encoded once and kept in a small LRU cache (the empty
        prompt of the unconditional branch is needed by every request)."""
        encoder = self.components.text_encoder
        if encoder is None:
            raise RuntimeError("this checkpoint has no CLIP text encoder")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with self.placement.resident(encoder):
                embedded = encoder(encoder.tokenize(missing).to(self.placement.device)).to(self.placement.dtype)
            for prompt, emb in zip(missing, embedded):
                self._text_cache[prompt] = emb
        result = torch.stack([self._text_cache[p] for p in prompts])
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return result

    def text_context(self, prompt: str, batch: int, guided: bool) -> Pair:
        """The prompt's text tokens for every window and, when guided, the empty prompt's."""
        cond = self.text_embeddings([prompt]).expand(batch, -1, -1)
        return cond, self.text_embeddings([""]).expand(batch, -1, -1) if guided else None

    @torch.no_grad()
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """OpenCLIP image tokens `[B, 257, width]` of images in [-1, 1]."""
        encoder = self.components.image_encoder
        if encoder is None:
            raise RuntimeError("this checkpoint has no CLIP image encoder")
        with self.placement.resident(encoder):
            return encoder(pixels.to(self.placement.device, self.placement.dtype))

    def window_image_tokens(self, pixels: torch.Tensor, windows: Sequence[tuple[int, int]], guided: bool) -> Pair:
        """CLIP tokens of each window's first keyframe (each distinct one encoded once) and, when guided, the
        all-zero image's (computed once per encoder)."""
        first = [a for a, _ in windows]
        distinct = sorted(set(first))
        tokens = self.image_tokens(pixels[distinct])[[distinct.index(i) for i in first]]
        if not guided:
            return tokens, None
        if self._zero_image_tokens is None:
            height, width = self.components.config.pixel_size
            zeros = torch.zeros(1, 3, height, width, device=self.placement.device, dtype=self.placement.dtype)
            self._zero_image_tokens = self.image_tokens(zeros)
        return tokens, self._zero_image_tokens.expand(len(windows), -1, -1)

    @torch.no_grad()
    def assemble(
        self,
        latents: torch.Tensor,
        hidden_states: Sequence[torch.Tensor],
        windows: Sequence[tuple[int, int]],
        text: Pair,
        image_tokens: Pair,
        motion_steps: int,
    ) -> Conditioning:
        """Pin each window's latents, gather its references, and build the UNet context (text then image)."""
        device, dtype = self.placement.device, self.placement.dtype
        first = [a for a, _ in windows]
        last = [b for _, b in windows]
        batch = len(windows)
        c_concat = concat_condition(latents[first], latents[last], self.components.config.num_frames)
        refs = [torch.stack([h[first], h[last]], dim=2) for h in hidden_states]
        resampler = self.components.resampler
        text = tuple(None if t is None else t.to(device, dtype).expand(batch, -1, -1) for t in text)
        image = tuple(None if t is None else resampler(t.to(device, dtype).expand(batch, -1, -1)) for t in image_tokens)
        context = [None if t is None else torch.cat([t, i.to(t.dtype)], dim=1) for t, i in zip(text, image)]
        fs = torch.full((batch,), motion_steps, device=device, dtype=torch.long)
        return Conditioning(
            c_concat=c_concat, context_cond=context[0], context_uncond=context[1], ref_context=refs, fs=fs,
            keyframe_latents=latents, text=text, image=image,
        )
