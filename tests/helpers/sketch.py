"""A sketch encoder checkpoint in the official key layout with the random weights of tests/fixtures/sketch_tiny.

The weights are rebuilt from the fixtures' (seed, key, shape) recipe (`tooncrafter.fixtures.random_state_dict`)
for the UNet they must fit, so the file never lives in the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tooncrafter.fixtures import random_state_dict
from tooncrafter.model.config import UNetConfig
from tooncrafter.model.sketch_encoder import (
    SketchEncoderConfig,
    build_sketch_encoder_on_meta,
)

SKETCH_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sketch_tiny"


def tiny_sketch_state(unet: UNetConfig) -> dict[str, torch.Tensor]:
    meta = json.loads((SKETCH_FIXTURES / "fixtures_meta.json").read_text())
    encoder = build_sketch_encoder_on_meta(SketchEncoderConfig.from_unet(unet))
    shapes = {key: tuple(value.shape) for key, value in encoder.state_dict().items()}
    return random_state_dict(shapes, meta["seed"], damped=meta["damped"])


def write_tiny_sketch_checkpoint(path: Path, unet: UNetConfig) -> Path:
    """`path` (a `sketch_encoder.ckpt`-style flat dict of tensors) for a UNet of config `unet`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_sketch_state(unet), path)
    return path
