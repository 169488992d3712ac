"""Sketches in: line art (or any image) -> the `[1, H, W]` tensor the sketch encoder reads.

The sketch encoder was trained on white lines on black in [0, 1], at the frame size. The public
re-implementations prepare a user's drawing like this (mattyamonaca/ToonCrafter_with_SketchGuidance,
`scripts/gradio/i2v_test_application.py`): greyscale (ITU-R 601 luma), inverted (they expect dark
lines on light paper), divided by 255, resized and centre-cropped like the keyframes. kijai's
ComfyUI node takes the first channel of an image already in [0, 1] and leaves the polarity to the user.
`prepare_sketch` does the former, with the polarity read from the drawing by default, and the
keyframes' own resize/crop (`media.images.fit_image`) so a sketch traced over a keyframe stays aligned.

`sketch_from_image` turns any picture (a keyframe, a frame of a reference clip) into such line art
with the Canny edge detector of kornia (`kornia.filters.canny`, a maintained PyTorch library; install
the `sketch` extra), run at the frame size so the lines are one pixel wide there, as drawn lines are.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

from tooncrafter.media import MediaError
from tooncrafter.media.images import fit_image

LinePolarity = Literal["auto", "dark", "light"]
# Canny hysteresis thresholds on kornia's unnormalised Sobel magnitude of a [0, 1] image (a
# blurred unit step peaks near 2.6), and the Gaussian blur before it: kornia's defaults.
DEFAULT_CANNY_LOW = 0.1
DEFAULT_CANNY_HIGH = 0.2
DEFAULT_CANNY_SIGMA = 1.0


def _greyscale(image: Image.Image) -> Image.Image:
    """Pillow's "L" conversion is the ITU-R 601 luma the references use (cv2 BGR2GRAY)."""
    if image.mode in ("L", "1") or image.mode.startswith("I") or image.mode == "F":
        return image.convert("L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # strokes on a transparent sheet: put the sheet on white, like media.decode_image
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("L")


def prepare_sketch(
    image: Image.Image,
    height: int,
    width: int,
    *,
    lines: LinePolarity = "auto",
    fit: Literal["cover", "official"] = "cover",
) -> torch.Tensor:
    """Line art -> `[1, height, width]` float32 in [0, 1], white lines on black.

    lines: "dark" = dark strokes on light paper (inverted, as mattyamonaca's demo always does), "light" =
    already white on black (kept), "auto" (default) = "dark" when the median grey is light (paper is
    most of a drawing), else "light". fit: as for the keyframes (`preprocess_keyframe`).
    """
    if lines not in ("auto", "dark", "light"):
        raise MediaError(f"sketch lines must be 'auto', 'dark' or 'light', got {lines!r}")
    grey = np.asarray(_greyscale(image), dtype=np.uint8)
    if lines == "dark" or (lines == "auto" and np.median(grey) > 127):
        grey = 255 - grey
    fitted = fit_image(Image.fromarray(np.ascontiguousarray(grey)), height, width, fit=fit)
    pixels = torch.from_numpy(np.array(fitted, dtype=np.uint8, copy=True))
    return pixels.to(torch.float32).div(255).unsqueeze(0).contiguous()


def sketch_from_image(
    image: Image.Image,
    height: int,
    width: int,
    *,
    low_threshold: float = DEFAULT_CANNY_LOW,
    high_threshold: float = DEFAULT_CANNY_HIGH,
    sigma: float = DEFAULT_CANNY_SIGMA,
    fit: Literal["cover", "official"] = "cover",
) -> torch.Tensor:
    """Any image -> a line sketch `[1, height, width]` (1.0 on edges, 0.0 elsewhere) for guidance.

    The image is fitted to the frame first (the keyframes' resize/crop), then kornia's Canny
    (Gaussian blur `sigma`, Sobel gradient, non-maximum suppression, hysteresis between the two
    thresholds) finds its edges. Lower thresholds keep fainter lines.
    """
    try:
        from kornia.filters import canny
    except ImportError as exc:  # an optional extra
        raise RuntimeError("sketch_from_image needs kornia: pip install 'tooncrafter[sketch]'") from exc
    if not 0 <= low_threshold <= high_threshold:
        raise MediaError(f"sketch edges: need 0 <= low_threshold <= high_threshold, got {low_threshold}, {high_threshold}")
    if sigma <= 0:
        raise MediaError(f"sketch edges: sigma must be positive, got {sigma}")
    grey = fit_image(_greyscale(image), height, width, fit=fit)
    pixels = torch.from_numpy(np.array(grey, dtype=np.uint8, copy=True)).to(torch.float32).div(255)
    kernel = 2 * int(round(3 * sigma)) + 1  # covers +-3 sigma
    _, edges = canny(pixels[None, None], low_threshold, high_threshold, kernel_size=kernel, sigma=(sigma, sigma))
    return edges[0].to(torch.float32).contiguous()
