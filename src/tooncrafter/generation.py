"""The seam between whoever receives a request (CLI, HTTP worker) and the pipeline that makes frames.

One small interface: a request of decoded keyframes and sampling options, a progress callback
called once per denoising step, a cancel check polled between steps, and frames back. The service
depends on this module only, so a test can swap in any object with a `generate` method.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
from PIL import Image

from tooncrafter.schema import MAX_SEED, ToonCrafterInput

ProgressCallback = Callable[[int, int], None]
"""Called as `on_step(step, total)` after each denoising step (1-based)."""
CancelCheck = Callable[[], bool]
"""Polled between denoising steps; True stops the request with `GenerationCancelled`."""


class GenerationCancelled(Exception):
    """The cancel check returned True; no frames were produced."""


@dataclass(frozen=True)
class GenerationRequest:
    """Decoded keyframes plus the endpoint's sampling options (seed already resolved)."""

    keyframes: list[Image.Image]
    seed: int
    prompt: str = ""
    steps: int = 50
    cfg_scale: float = 7.5
    eta: float = 1.0
    motion_steps: int = 10
    keyframe_lengths: list[int] | None = None
    keep_all_frames: bool = False

    @classmethod
    def from_input(cls, inputs: ToonCrafterInput, keyframes: list[Image.Image], seed: int) -> "GenerationRequest":
        """The endpoint's validated input with its keyframes decoded and its seed resolved."""
        return cls(
            keyframes=keyframes,
            seed=seed,
            prompt=inputs.prompt,
            steps=inputs.steps,
            cfg_scale=inputs.cfg_scale,
            eta=inputs.eta,
            motion_steps=inputs.motion_steps,
            keyframe_lengths=inputs.keyframe_lengths,
            keep_all_frames=inputs.keep_all_frames,
        )


@dataclass(frozen=True)
class GenerationResult:
    """Frames `[F, H, W, 3]` uint8 and the seed that made them."""

    frames: np.ndarray
    seed: int


class Generator(Protocol):            # what the service's worker needs from a model
    @property
    def num_frames(self) -> int: ...
    def __call__(self, request: GenerationRequest, *, on_step: ProgressCallback | None = None) -> GenerationResult: ...


def random_seed() -> int:
    """A fresh seed in 0..2^32-1 from the OS (never the global torch generator)."""
    return secrets.randbelow(MAX_SEED + 1)
