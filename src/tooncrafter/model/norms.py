"""Normalisation layers that keep their statistics in fp32.

The official model runs under fp16 autocast with GroupNorm computed in fp32; doing the same
explicitly (autocast off, fp32 math, cast back once) lets every component run in fp16/bf16 with the
same numerics, on CPU and GPU alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in fp32 (outside autocast); returns the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm with fp32 statistics (outside autocast); returns the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)
