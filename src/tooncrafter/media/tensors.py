"""Pictures <-> tensors: the official inference transform in, the official uint8 conversion out."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

from tooncrafter.media import MediaError
from tooncrafter.media.images import fit_image, to_rgb

# --------------------------------------------------------------------------------------------
# RGB image -> model input
# --------------------------------------------------------------------------------------------


def preprocess_keyframe(
    image: Image.Image | np.ndarray,
    height: int,
    width: int,
    *,
    fit: Literal["cover", "official"] = "cover",
) -> torch.Tensor:
    """RGB keyframe -> `[3, height, width]` float32 in [-1, 1], as the official inference transform.

    Official (`load_data_prompts`): `Resize(min(height, width))` (short side, PIL bilinear with
    antialias, long side truncated to int) -> `CenterCrop((height, width))` -> `x / 255` ->
    `(x - 0.5) / 0.5`. When the image's aspect ratio does not cover the frame (a 4:3 picture for
    the 320x512 model, any portrait picture for it), that transform pads black bars into the
    frame. `fit="cover"` (default) scales by whichever side covers the frame instead; it is
    bit-identical to the official transform whenever the official one does not pad.
    `fit="official"` reproduces the padding too.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise MediaError(f"expected a uint8 [H, W, 3] array, got {image.dtype} {list(image.shape)}")
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = to_rgb(image)
    image = fit_image(image, height, width, fit=fit)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)  # [3, H, W]
    # Same float ops as ToTensor + Normalize(0.5, 0.5), so the result is bit-identical.
    return pixels.to(torch.float32).div(255).sub(0.5).div(0.5).contiguous()


# --------------------------------------------------------------------------------------------
# Model output -> frames -> video
# --------------------------------------------------------------------------------------------


def video_to_frames(video: torch.Tensor) -> np.ndarray:
    """`[3, F, H, W]` in [-1, 1] -> uint8 `[F, H, W, 3]`, as the official saving code.

    clamp to [-1, 1], `(x + 1) / 2`, `* 255`, then truncation by `.to(uint8)`. Non-finite values
    are an error, not grey frames.
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise MediaError(f"expected a video [3, F, H, W], got {list(video.shape)}")
    x = video.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise MediaError("video contains NaN or infinite values")
    x = (x.clamp(-1.0, 1.0) + 1.0) / 2.0
    frames = (x * 255).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().numpy()


def frames_to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames `[F, H, W, 3]` (already at the model size) -> `[F, 3, H, W]` in [-1, 1], with the same float
    ops as `preprocess_keyframe`: generated frames fed back to the model (the in-between pass)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise MediaError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    return pixels.to(torch.float32).div(255).sub(0.5).div(0.5).contiguous()
