"""Frames in and out of the batch: the one layout change every video module makes.

Spatial layers see frames folded into the batch, `[(B T), C, H, W]`; temporal layers see
`[B, C, T, H, W]`. Both directions are pure layout (no arithmetic).
"""

from __future__ import annotations

import torch


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [(B T), C, H, W]."""
    return x.transpose(1, 2).flatten(0, 1)


def unfold_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[(B T), C, H, W] -> [B, C, T, H, W]."""
    return x.unflatten(0, (-1, num_frames)).transpose(1, 2)
