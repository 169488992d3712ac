"""The seam between whoever receives a request (CLI, HTTP worker, a library caller) and the model.

One small interface: a request of decoded keyframes and sampling options, one progress callback
called after every denoising step (raise `GenerationCancelled` in it to stop), and frames back. The
service depends on this module only, so a test can swap in any object that implements `Generator`.
The option defaults are the endpoint's own (`tooncrafter.schema`), written once there.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from tooncrafter.schema import MAX_SEED, field_default

if TYPE_CHECKING:
    from tooncrafter.schema import ToonCrafterInput

ProgressCallback = Callable[[int, int], None]
"""Called after every denoising step with (step, total), step 1-based and counted across every pass of the
request (a frame_multiplier adds passes). Raise GenerationCancelled in it to stop."""


class GenerationCancelled(Exception):
    """The request was stopped between two denoising steps; no frames were produced."""


class SketchGuidanceUnavailable(RuntimeError):
    """The request has sketches but this process cannot use them (no sketch encoder weights, or no kornia for
    `extract_lines`). The message says what the operator can do; the service answers it as a 422 naming
    `sketch_image_urls` (the request works without them)."""


@dataclass(frozen=True)
class Sketch:
    """Line art for output frame `frame` of the final clip (after loop and frame_multiplier).

    `extract_lines`: `image` is an ordinary picture whose Canny edges become the sketch
    (`media.sketches.sketch_from_image`) instead of a drawing read as it is (`prepare_sketch`).
    """

    frame: int
    image: Image.Image
    extract_lines: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """Decoded keyframes plus the endpoint's sampling options.

    `seed` is required: a library caller chooses it (or `random_seed()`) and never silently gets seed 0.
    """

    keyframes: list[Image.Image]
    seed: int
    prompt: str = field_default("prompt")
    steps: int = field_default("steps")
    cfg_scale: float = field_default("cfg_scale")
    eta: float = field_default("eta")
    motion_steps: int = field_default("motion_steps")
    keyframe_lengths: list[int] | None = field_default("keyframe_lengths")  # noqa: RUF009 (None: immutable)
    keep_all_frames: bool = field_default("keep_all_frames")
    loop: bool = field_default("loop")
    frame_multiplier: int = field_default("frame_multiplier")
    sketches: tuple[Sketch, ...] = ()
    sketch_scale: float = field_default("sketch_scale")

    @classmethod
    def from_input(
        cls,
        inputs: ToonCrafterInput,
        keyframes: list[Image.Image],
        seed: int,
        sketch_images: Sequence[Image.Image] = (),
    ) -> GenerationRequest:
        """The endpoint's validated input with its keyframes (and sketches, in `sketch_image_urls` order)
        decoded and its seed resolved."""
        entries = inputs.sketch_image_urls or []
        if len(sketch_images) != len(entries):
            raise ValueError(f"{len(entries)} sketch_image_urls but {len(sketch_images)} decoded sketches")
        sketches = tuple(Sketch(e.frame, image, e.extract_lines) for e, image in zip(entries, sketch_images))
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
            loop=inputs.loop,
            frame_multiplier=inputs.frame_multiplier,
            sketches=sketches,
            sketch_scale=inputs.sketch_scale,
        )

    @property
    def uses_sketches(self) -> bool:
        """Whether sketch guidance can change anything (sketches given at a non-zero scale)."""
        return bool(self.sketches) and self.sketch_scale != 0


@dataclass(frozen=True)
class GenerationResult:
    """Frames `[F, H, W, 3]` uint8 and the seed that made them."""

    frames: np.ndarray
    seed: int


class Generator(Protocol):
    """What the CLI and the service need from a loaded model (`ToonCrafterPipeline`, or a test fake)."""

    @property
    def num_frames(self) -> int: ...

    def __call__(self, request: GenerationRequest, *, on_step: ProgressCallback | None = None) -> GenerationResult: ...


@runtime_checkable
class BatchingGenerator(Generator, Protocol):
    """A generator that can run concurrent calls as one batch (`ToonCrafterPipeline`: one UNet call per step).

    `join_batch(n)` before starting n concurrent calls; each call's owner calls `leave_batch()` once, when its
    call has returned or will not be made, so the others stop waiting for it."""

    def join_batch(self, count: int) -> None: ...

    def leave_batch(self) -> None: ...


def random_seed() -> int:
    """A fresh seed in 0..2^32-1 from the OS (never the global torch generator)."""
    return secrets.randbelow(MAX_SEED + 1)
