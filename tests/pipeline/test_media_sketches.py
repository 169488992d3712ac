"""media.sketches: line art -> white-on-black [1, H, W], aligned with the keyframes; Canny line extraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tooncrafter.media import MediaError
from tooncrafter.media.sketches import prepare_sketch, sketch_from_image
from tooncrafter.media.tensors import preprocess_keyframe

H, W = 64, 128


def _drawing(size: tuple[int, int] = (256, 128), *, ink: int = 0, paper: int = 255, mode: str = "RGB") -> Image.Image:
    """Two strokes on a sheet, twice the frame size (so resizing is exercised)."""
    colour = (paper,) * 3 if mode == "RGB" else paper
    image = Image.new(mode, size, colour)
    draw = ImageDraw.Draw(image)
    stroke = (ink,) * 3 if mode == "RGB" else ink
    draw.line((20, 10, 230, 100), fill=stroke, width=4)
    draw.ellipse((60, 30, 120, 90), outline=stroke, width=4)
    return image


def test_dark_lines_on_paper_become_white_on_black():
    sketch = prepare_sketch(_drawing(), H, W)
    assert sketch.shape == (1, H, W) and sketch.dtype == torch.float32
    assert 0.0 <= float(sketch.min()) and float(sketch.max()) <= 1.0
    assert float(sketch.median()) == 0.0  # the paper is black now
    assert float(sketch.max()) > 0.9  # and the strokes white


@pytest.mark.parametrize("lines", ["auto", "light"])
def test_white_on_black_is_kept(lines: str):
    drawing = _drawing(ink=255, paper=0)
    assert torch.equal(prepare_sketch(drawing, H, W, lines=lines), prepare_sketch(_drawing(), H, W))


def test_explicit_polarity_overrides_the_guess():
    white_on_black = _drawing(ink=255, paper=0)
    inverted = prepare_sketch(white_on_black, H, W, lines="dark")
    # inverted before the resize (the reference order), so rounding may differ by one grey level
    torch.testing.assert_close(inverted, 1 - prepare_sketch(white_on_black, H, W, lines="light"), rtol=0, atol=1.01 / 255)
    with pytest.raises(MediaError, match="sketch lines"):
        prepare_sketch(white_on_black, H, W, lines="inverted")  # type: ignore[arg-type]


@pytest.mark.parametrize("fit", ["cover", "official"])
def test_sketch_lands_on_the_keyframe_pixels(fit: str):
    """Same resize/crop as the keyframes: a line traced over a keyframe stays on it."""
    drawing = _drawing((300, 120), ink=255, paper=0)  # another aspect ratio: crop and resize both matter
    sketch = prepare_sketch(drawing, H, W, lines="light", fit=fit)  # type: ignore[arg-type]
    keyframe = preprocess_keyframe(drawing, H, W, fit=fit)  # type: ignore[arg-type]
    torch.testing.assert_close(sketch[0], (keyframe[0] + 1) / 2, rtol=0, atol=1e-6)


def test_strokes_on_a_transparent_sheet():
    sheet = Image.new("RGBA", (256, 128), (0, 0, 0, 0))
    ImageDraw.Draw(sheet).line((20, 10, 230, 100), fill=(0, 0, 0, 255), width=4)
    sketch = prepare_sketch(sheet, H, W)
    assert float(sketch.median()) == 0.0 and float(sketch.max()) > 0.9


def test_greyscale_is_luma():
    red = Image.new("RGB", (W, H), (255, 0, 0))
    value = float(prepare_sketch(red, H, W, lines="light")[0, 0, 0])
    assert value == pytest.approx(76 / 255)  # 0.299 * 255, as cv2's BGR2GRAY


def test_sketch_from_image_finds_the_outlines():
    pytest.importorskip("kornia")
    picture = Image.new("RGB", (W, H), (240, 230, 200))
    ImageDraw.Draw(picture).rectangle((30, 16, 90, 48), fill=(200, 40, 40))  # a flat-coloured shape
    edges = sketch_from_image(picture, H, W)
    assert edges.shape == (1, H, W) and edges.dtype == torch.float32
    assert set(torch.unique(edges).tolist()) <= {0.0, 1.0}
    on_border = edges[0, 14:51, 28:93].clone()
    on_border[5:-5, 5:-5] = 0
    assert float(on_border.sum()) > 100  # the outline is found
    assert float(edges[0, 22:42, 36:84].sum()) == 0  # nothing inside the flat shape
    assert float(edges[0, :8].sum()) == 0 and float(edges[0, :, :20].sum()) == 0  # nor on the flat background
    # its output is a sketch in the encoder's convention: prepare_sketch leaves it as it is
    as_image = Image.fromarray((edges[0].numpy() * 255).astype(np.uint8))
    assert torch.equal(prepare_sketch(as_image, H, W), edges)


def test_sketch_from_image_thresholds_are_checked():
    pytest.importorskip("kornia")
    picture = Image.new("RGB", (W, H), (255, 255, 255))
    with pytest.raises(MediaError, match="low_threshold <= high_threshold"):
        sketch_from_image(picture, H, W, low_threshold=0.5, high_threshold=0.1)
    with pytest.raises(MediaError, match="sigma"):
        sketch_from_image(picture, H, W, sigma=0)
