"""Convolutions over tiny feature maps as one matrix product, for inference on CPU.

At the UNet's deepest levels a frame is only a few pixels (2x2 and 4x4 at 128x128 px), while the layers are
the widest (1280-2560 channels). oneDNN's direct convolution is poorly used there, even on a packed weight:
the same convolution as one GEMM -- the input laid out as `[positions, taps * C]` rows (a few MB at these
sizes), times the weight as `[O, taps * C]` -- ran 1.3-2.8x faster on Zen 5 (2 threads, median of 9; bf16
`[32, 1280, 4, 4]` 3x3 29.0 -> 16.5 ms, `[32, 1280, 2, 2]` 12.7 -> 4.5 ms, the temporal `(3, 1, 1)` conv on
`[2, 1280, 16, 4, 4]` 8.3 -> 5.6 ms; fp32 55.0 -> 33.4, 37.9 -> 9.2 and 13.6 -> 12.2 ms) and ties or loses
from 8x8 on (bf16 3x3 at 8x8 66.8 vs 67.3 ms, 640 ch 17.2 vs 14.2 ms).

Two forms of the weight (`benchmarks/README.md`, Zen 5 section, change 6):
* packed, taps outer and channels inner (`PrepackedConv` in `cpu_prepack.py`, for weights on the heap: a
  converted bf16 copy costs nothing more packed). The rows are one contiguous copy of the padded input.
* read in place, channels outer (`GemmConv` here, for memory-mapped weights: their pages stay file pages that
  the request gives back before the decodes, instead of becoming a heap copy that stays). The rows are built tap
  by tap and transposed; oneDNN multiplies them by the plain weight (fp32 `[32, 1280, 4, 4]` 43.6 ms against
  MKL's 81.5 ms on Zen 5; the packed form 36.5 ms).
Larger maps keep the library convolution or its oneDNN-packed form: `GemmConv` only dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tooncrafter.model.onednn import linear_prepack_available

# Output pixels per frame at or below which the GEMM form runs: on Zen 5 (2 threads, bf16 and fp32, against
# oneDNN's packed convolution) both the 3x3 and the temporal convs win at 2x2 and 4x4 and tie or lose at 8x8.
GEMM_MAX_PIXELS = 16


@dataclass(frozen=True)
class ConvGeometry:
    """A zero-padded, ungrouped, undilated convolution seen as a 2D one: a temporal `(k, 1, 1)` Conv3d runs over
    `[B, C, T, H*W]` with a `(k, 1)` kernel."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    temporal: bool

    @classmethod
    def of(cls, conv: nn.Conv2d | nn.Conv3d) -> ConvGeometry:
        if not supports(conv):
            raise ValueError(f"gemm conv: unsupported convolution {conv}")
        if isinstance(conv, nn.Conv3d):
            return cls((int(conv.kernel_size[0]), 1), (int(conv.stride[0]), 1), (int(conv.padding[0]), 0), True)
        return cls(_pair(conv.kernel_size), _pair(conv.stride), _pair(conv.padding), False)

    def output_pixels(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Pixels of one output frame for an input of `shape` (a temporal conv keeps the frame size)."""
        if self.temporal:
            return int(shape[-1] * shape[-2])
        out_h, out_w = self._output_size(int(shape[-2]), int(shape[-1]))
        return out_h * out_w

    def _output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def rows(self, x: torch.Tensor, taps_outer: bool) -> torch.Tensor:
        """The input as `[positions, taps * C]`, taps outer and channels inner, or (`taps_outer=False`) channels
        outer, the order of a plain weight's `[O, C, kh, kw]`."""
        x = self._as_2d(x)
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        out_h, out_w = self._output_size(h, w)
        padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # [N, H, W, C]: one copy when padded
        s = padded.stride()
        windows = padded.as_strided((n, out_h, out_w, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1], s[2], s[3]))
        rows = windows.reshape(n * out_h * out_w, kh * kw * c)
        if taps_outer:
            return rows
        # two contiguous copies beat one strided gather: 1.3 against 4.5 ms for bf16 [32, 1280, 4, 4] on Zen 5
        return rows.view(-1, kh * kw, c).transpose(1, 2).reshape(n * out_h * out_w, c * kh * kw)

    def run(self, x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None, taps_outer: bool) -> torch.Tensor:
        """The convolution of `x` as one product with `matrix`: `[O, taps * C]` in the order `taps_outer` says,
        plain or oneDNN-packed (`matmul`)."""
        return self.output(matmul(self.rows(x, taps_outer), matrix, bias), x)

    def output(self, product: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`[positions, O]` back as the convolution's output of input `x` (a channels-last view, no copy)."""
        if self.temporal:
            b, _, t, h, w = x.shape
            out_t = (t + 2 * self.padding[0] - self.kernel[0]) // self.stride[0] + 1
            return product.view(b, out_t, h, w, -1).permute(0, 4, 1, 2, 3)
        out_h, out_w = self._output_size(x.shape[-2], x.shape[-1])
        return product.view(x.shape[0], out_h, out_w, -1).permute(0, 3, 1, 2)

    def _as_2d(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:3], -1) if self.temporal else x


def weight_taps_outer(weight: torch.Tensor) -> torch.Tensor:
    """A plain `[O, C, kh, kw]` (or `[O, C, k, 1, 1]`) weight as the `[O, taps * C]` matrix of `rows(taps_outer=True)`."""
    o, c = weight.shape[:2]
    return weight.reshape(o, c, -1).transpose(1, 2).reshape(o, -1)


def weight_from_taps_outer(matrix: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The inverse of `weight_taps_outer`: the plain weight of `shape` again (a contiguous copy)."""
    o, c = shape[:2]
    return matrix.reshape(o, -1, c).transpose(1, 2).reshape(shape).contiguous()


def matmul(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`rows @ weight.T + bias` for an `[O, K]` weight, plain or oneDNN-packed (packed only where oneDNN runs the
    dtype): on oneDNN where it runs this dtype (MKL's fp32 GEMM takes twice its time on AMD EPYC), else PyTorch's own."""
    if linear_prepack_available(rows.dtype):
        return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return torch.addmm(bias, rows, weight.t()) if bias is not None else rows @ weight.t()


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    return int(values[0]), int(values[1])


def conv2d_as_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding)` (no groups, no dilation) as one product on the weight in place.

    Returns a channels-last tensor (the GEMM's natural output layout); values agree with `F.conv2d` up to
    float summation order.
    """
    geometry = ConvGeometry(_pair(weight.shape[2:]), _pair(stride), _pair(padding), temporal=False)
    return geometry.run(x, weight.reshape(weight.shape[0], -1), bias, taps_outer=False)


class GemmConv(nn.Module):
    """A Conv2d, or a Conv3d with a kernel along time only (`(k, 1, 1)`), that runs as one GEMM on small CPU maps,
    reading its weight in place.

    `fallback` is the original convolution (or the `PrepackedConv` that `prepack_convolutions` later puts in its
    place): it runs every other input. Inference only, like `PrepackedConv`: the parameters live in the child.
    """

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, max_pixels: int = GEMM_MAX_PIXELS) -> None:
        super().__init__()
        self.geometry = ConvGeometry.of(conv)
        self.fallback: nn.Module = conv
        self.max_pixels = max_pixels

    def _dense(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The dense weight and the bias; no weight once a `PrepackedConv` fallback has packed it (it then runs)."""
        fallback = self.fallback
        weight = fallback.weight if isinstance(fallback, (nn.Conv2d, nn.Conv3d)) else fallback.dense_weight
        return weight, fallback.bias

    def small(self, shape: tuple[int, ...] | torch.Size) -> bool:
        """Whether the output maps of an input of `shape` are small enough for the GEMM form to win."""
        return self.geometry.output_pixels(shape) <= self.max_pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not self.small(x.shape):
            return self.fallback(x)
        weight, bias = self._dense()
        if weight is None:
            return self.fallback(x)
        return self.geometry.run(x, weight.reshape(weight.shape[0], -1), bias, taps_outer=False)

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


def use_gemm_convolutions(
    root: nn.Module, max_pixels: int = GEMM_MAX_PIXELS, only: Callable[[nn.Module], bool] | None = None
) -> int:
    """Wrap every supported convolution under `root` (that `only` accepts, if given) in a `GemmConv`; returns how
    many were wrapped.

    Do this after the weights are loaded (the parameters move to `<name>.fallback.*`); the model's results are
    unchanged up to float summation order.
    """
    wrapped = 0
    for parent in list(root.modules()):
        if isinstance(parent, GemmConv):
            continue
        for name, child in list(parent.named_children()):
            if supports(child) and (only is None or only(child)):
                setattr(parent, name, GemmConv(child, max_pixels))
                wrapped += 1
    return wrapped
