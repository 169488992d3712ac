"""Normalisation layers that keep their statistics in fp32.

The official model runs under fp16 autocast with GroupNorm computed in fp32; doing the same
explicitly (autocast off, fp32 math, cast back once) lets every component run in fp16/bf16 with the
same numerics, on CPU and GPU alike.

On CPU the native GroupNorm and LayerNorm kernels already accumulate bf16/fp16 input in fp32 (their
"mixed type" path) and round once on output, so there the low-precision tensor goes in as it is: the
same math without two activation-sized casts per norm (mid bf16 UNet profile: `_to_copy` ~12% of a call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# whether CPU low-precision input skips the explicit fp32 round trip (see the module docstring)
NATIVE_LOW_PRECISION_ON_CPU = True


def _native(x: torch.Tensor) -> bool:
    return NATIVE_LOW_PRECISION_ON_CPU and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def _autocast_off(x: torch.Tensor) -> torch.autocast:
    # the meta device (shape-only runs: `cpu_inference.pack_for_input`) has no autocast state of its own
    return torch.autocast(device_type="cpu" if x.device.type == "meta" else x.device.type, enabled=False)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in fp32 (outside autocast); returns the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native(x):
            with torch.autocast(device_type="cpu", enabled=False):
                return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        with _autocast_off(x):
            out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm with fp32 statistics (outside autocast); returns the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native(x):
            with torch.autocast(device_type="cpu", enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        with _autocast_off(x):
            out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)
