"""Sketch guidance for one request: drawings at the model size, the window frames they guide, the encoder.

A request's sketches name frames of the final clip. `keyframes.plan_clip` says where each of those
frames comes from (a pass, a window, a frame of that window), so each sketch guides exactly the
window frame that becomes its output frame; every other frame of every window gets no guidance.
The sketch encoder (`sketch_encoder.ckpt`) is loaded on the first request that uses sketches and
kept: a process that never sees one never reads the file.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from tooncrafter.denoising import SketchGuidance
from tooncrafter.generation import Sketch, SketchGuidanceUnavailable
from tooncrafter.keyframes import FrameSource
from tooncrafter.media.sketches import prepare_sketch, sketch_from_image
from tooncrafter.model.config import UNetConfig
from tooncrafter.model.cpu_inference import specialise_for_cpu
from tooncrafter.model.sketch_encoder import (
    SketchEncoder,
    SketchEncoderConfig,
    load_sketch_encoder,
)
from tooncrafter.placement import Placement

logger = logging.getLogger(__name__)


def prepare_sketches(sketches: Sequence[Sketch], height: int, width: int, num_output_frames: int) -> dict[int, torch.Tensor]:
    """Output frame -> its sketch `[1, H, W]` in [0, 1], white lines on black (`media.sketches`)."""
    prepared: dict[int, torch.Tensor] = {}
    for sketch in sketches:
        if not 0 <= sketch.frame < num_output_frames:
            raise ValueError(f"sketch for frame {sketch.frame}: the clip has {num_output_frames} frames (0 to {num_output_frames - 1})")
        if sketch.frame in prepared:
            raise ValueError(f"two sketches for frame {sketch.frame}")
        if sketch.extract_lines:
            try:
                prepared[sketch.frame] = sketch_from_image(sketch.image, height, width)
            except RuntimeError as exc:  # kornia is an optional extra
                raise SketchGuidanceUnavailable(str(exc)) from exc
        else:
            prepared[sketch.frame] = prepare_sketch(sketch.image, height, width)
    return prepared


def window_sketches(
    prepared: dict[int, torch.Tensor], sources: Sequence[FrameSource], stage: int, windows: Sequence[int], num_frames: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sketches `[B, T, 1, H, W]` and frame mask `[B, T]` for windows `windows` (B of them) of pass `stage`,
    or None when no sketch lands there."""
    row_of = {window: row for row, window in enumerate(windows)}
    hits = [
        (row_of[source.window], source.frame, sketch)
        for frame, sketch in prepared.items()
        if (source := sources[frame]).stage == stage and source.window in row_of
    ]
    if not hits:
        return None
    shape = next(iter(prepared.values())).shape
    sketches = torch.zeros(len(windows), num_frames, *shape)
    mask = torch.zeros(len(windows), num_frames, dtype=torch.bool)
    for row, frame, sketch in hits:
        sketches[row, frame] = sketch
        mask[row, frame] = True
    return sketches, mask


class LazySketchEncoder:
    """The sketch encoder for a UNet, read from `checkpoint` (None: the hub's `sketch_encoder.ckpt`) on first use."""

    def __init__(self, checkpoint: str | Path | None, unet: UNetConfig, placement: Placement) -> None:
        self.checkpoint = checkpoint
        self.config = SketchEncoderConfig.from_unet(unet)
        self.placement = placement
        self._encoder: SketchEncoder | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def get(self) -> SketchEncoder:
        """The loaded encoder; a missing or mismatched file is `SketchGuidanceUnavailable` naming the fix."""
        with self._lock:
            if self._encoder is None:
                from tooncrafter.model.checkpoint import CheckpointError
                from tooncrafter.weights import (
                    WeightsNotFoundError,
                    resolve_sketch_checkpoint,
                )

                try:
                    path = resolve_sketch_checkpoint(self.checkpoint)
                    logger.info("loading the sketch encoder from %s", path)
                    encoder = load_sketch_encoder(path, self.config, device=self.placement.device, dtype=self.placement.dtype)
                    if self.placement.device.type == "cpu":
                        specialise_for_cpu(encoder)  # it runs every step beside the UNet: the same fast paths
                    self._encoder = encoder
                except (WeightsNotFoundError, CheckpointError) as exc:
                    raise SketchGuidanceUnavailable(str(exc)) from exc
            return self._encoder

    def guidance(self, layout: tuple[torch.Tensor, torch.Tensor] | None, scale: float) -> SketchGuidance | None:
        """What `guided_denoiser` takes for one batch (None: nothing to guide, the encoder is not even loaded)."""
        if layout is None or scale == 0:
            return None
        sketches, mask = layout
        return SketchGuidance(self.get(), sketches, mask, scale)
