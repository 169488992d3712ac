"""Convolutions over tiny feature maps as one matrix product, for inference on CPU.

At the UNet's deepest levels a frame is only a few pixels (2x2 and 4x4 at 128x128 px), while the layers are
the widest (1280-2560 channels). oneDNN's direct convolution is poorly used there: it is tuned for large
images and re-lays out the weight on every call. The same convolution as one GEMM -- the input unfolded into
`[positions, C*kh*kw]` columns (a few MB at these sizes), times the weight viewed as `[O, C*kh*kw]`, no weight
copy -- runs 2-7x faster in our measurements on Sapphire Rapids (`benchmarks/README.md`), and it reads the
dense weight in place, so a memory-mapped fp32 checkpoint stays a mapped page instead of a packed copy.

Larger maps keep the library convolution (or its oneDNN-packed form, `cpu_prepack.py`): the module only
dispatches. Applied after loading, for inference on CPU (`ToonCrafterPipeline.from_pretrained`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Output pixels per frame at or below which the GEMM form wins, measured on a quiet Sapphire Rapids (2 threads):
# spatial 3x3 convs win up to 4x4 outputs in bf16 (1280 ch: 37 -> 17 ms) and tie there in fp32 (69 vs 74 ms),
# win at 2x2 in both (fp32 33 -> 22 ms, 2560 -> 1280 ch: 116 -> 39 ms); the temporal (3, 1, 1) convs win at
# 2x2 only (fp32 7.7 -> 6.6, bf16 3.4 -> 2.1 ms) and lose at 4x4; everything loses at 8x8.
GEMM_MAX_PIXELS = 16
TEMPORAL_GEMM_MAX_PIXELS = 4


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    return int(values[0]), int(values[1])


def conv2d_as_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding)` (no groups, no dilation) as unfold + one matrix product.

    Returns a channels-last tensor (the GEMM's natural output layout); values agree with `F.conv2d` up to
    float summation order.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    out_h = (h + 2 * padding[0] - kh) // stride[0] + 1
    out_w = (w + 2 * padding[1] - kw) // stride[1] + 1
    columns = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # [N, C*kh*kw, L], rows ordered (C, kh, kw)
    rows = columns.transpose(1, 2).reshape(n * out_h * out_w, c * kh * kw)
    flat_weight = weight.reshape(o, c * kh * kw)
    out = torch.addmm(bias, rows, flat_weight.t()) if bias is not None else rows @ flat_weight.t()
    return out.view(n, out_h, out_w, o).permute(0, 3, 1, 2)


class GemmConv(nn.Module):
    """A Conv2d, or a Conv3d with a kernel along time only (`(k, 1, 1)`), that runs as one GEMM on small CPU maps.

    `fallback` is the original convolution (or the `PrepackedConv` that `prepack_convolutions` later puts in its
    place): it runs every other input. Inference only, like `PrepackedConv`: the parameters live in the child.
    """

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, max_pixels: int = GEMM_MAX_PIXELS) -> None:
        super().__init__()
        if not supports(conv):
            raise ValueError(f"gemm conv: unsupported convolution {conv}")
        self.fallback: nn.Module = conv
        self.temporal = isinstance(conv, nn.Conv3d)
        self.stride = (int(conv.stride[0]), 1) if self.temporal else _pair(conv.stride)
        self.padding = (int(conv.padding[0]), 0) if self.temporal else _pair(conv.padding)
        self.kernel = (int(conv.kernel_size[0]), 1) if self.temporal else _pair(conv.kernel_size)
        self.max_pixels = max_pixels

    def _dense(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The dense weight and the bias; no weight once a `PrepackedConv` fallback has packed it (it then runs)."""
        fallback = self.fallback
        weight = fallback.weight if isinstance(fallback, (nn.Conv2d, nn.Conv3d)) else fallback.dense_weight
        return weight, fallback.bias

    def _small(self, x: torch.Tensor) -> bool:
        """Whether this input's output maps are small enough for the GEMM form to win."""
        if self.temporal:
            return x.shape[-1] * x.shape[-2] <= min(self.max_pixels, TEMPORAL_GEMM_MAX_PIXELS)
        kh, kw = self.kernel
        out_h = (x.shape[-2] + 2 * self.padding[0] - kh) // self.stride[0] + 1
        out_w = (x.shape[-1] + 2 * self.padding[1] - kw) // self.stride[1] + 1
        return out_h * out_w <= self.max_pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not self._small(x):
            return self.fallback(x)
        weight, bias = self._dense()
        if weight is None:
            return self.fallback(x)
        if not self.temporal:
            return conv2d_as_gemm(x, weight, bias, self.stride, self.padding)
        # temporal conv: [B, C, T, H, W] as a 2D conv over [B, C, T, H*W] with a (k, 1) kernel
        b, c, t, h, w = x.shape
        out = conv2d_as_gemm(x.reshape(b, c, t, h * w), weight.squeeze(-1), bias, self.stride, self.padding)
        return out.reshape(b, out.shape[1], out.shape[2], h, w)

    def extra_repr(self) -> str:
        return f"max_pixels={self.max_pixels}"


def supports(conv: nn.Module) -> bool:
    """Zero-padded, ungrouped, undilated Conv2d; or Conv3d with a `(k, 1, 1)` kernel, stride 1 in space, no spatial padding."""
    if type(conv) not in (nn.Conv2d, nn.Conv3d) or conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str) or any(d != 1 for d in conv.dilation):
        return False
    if isinstance(conv, nn.Conv3d):
        return tuple(conv.kernel_size[1:]) == (1, 1) and tuple(conv.stride[1:]) == (1, 1) and tuple(conv.padding[1:]) == (0, 0)
    return True


def use_gemm_convolutions(root: nn.Module, max_pixels: int = GEMM_MAX_PIXELS) -> int:
    """Wrap every supported convolution under `root` in a `GemmConv`; returns how many were wrapped.

    Do this after the weights are loaded (the parameters move to `<name>.fallback.*`); the model's results are
    unchanged up to float summation order.
    """
    wrapped = 0
    for parent in list(root.modules()):
        if isinstance(parent, GemmConv):
            continue
        for name, child in list(parent.named_children()):
            if supports(child):
                setattr(parent, name, GemmConv(child, max_pixels))
                wrapped += 1
    return wrapped
