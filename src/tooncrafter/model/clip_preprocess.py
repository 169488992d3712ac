"""The CLIP image preprocessing of the official image embedder, in plain torch.

The official `FrozenOpenCLIPImageEmbedderV2.preprocess` calls
`kornia.geometry.resize(x, (S, S), interpolation="bicubic", align_corners=True, antialias=True)`,
maps [-1, 1] to [0, 1] and normalises with the OpenAI CLIP mean/std. We reproduce kornia's
resize exactly instead of depending on kornia:

* antialias only when some side shrinks (`max(in_i / out_i) > 1`); then a separable Gaussian
  blur over both sides with `sigma_i = max((in_i/out_i - 1)/2, 0.001)` and kernel size
  `int(max(4 sigma_i, 3))` bumped to odd, reflect borders, width pass before height pass;
* then `F.interpolate(mode="bicubic", align_corners=True)` (Keys cubic, a = -0.75).

Everything is computed in fp32 and cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# OpenAI CLIP normalisation, hard-coded in the official embedder (not read from open_clip).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def gaussian_kernel1d(size: int, sigma: float, *, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1D Gaussian of `size` taps centred on `size // 2` (kornia's `get_gaussian_kernel1d`), fp32 [size]."""
    x = torch.arange(size, device=device, dtype=torch.float32) - float(size // 2)
    if size % 2 == 0:
        x = x + 0.5
    sigma_t = torch.tensor(sigma, device=device, dtype=torch.float32)
    g = torch.exp(-x.pow(2.0) / (2 * sigma_t.pow(2.0)))
    return g / g.sum()


def _blur_axis(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Depthwise correlation of [B, C, H, W] with a 1D kernel along W (dim=-1) or H (dim=-2), reflect-padded."""
    b, c, h, w = x.shape
    k = kernel.numel()
    left = (k - 1) // 2
    right = k - 1 - left
    if dim == -1:
        x = F.pad(x, (left, right, 0, 0), mode="reflect")
        weight = kernel.view(1, 1, 1, k)
    else:
        x = F.pad(x, (0, 0, left, right), mode="reflect")
        weight = kernel.view(1, 1, k, 1)
    out = F.conv2d(x.reshape(b * c, 1, x.shape[-2], x.shape[-1]), weight)
    return out.view(b, c, h, w)


def _odd_kernel_size(sigma: float) -> int:
    size = int(max(2.0 * 2 * sigma, 3))
    return size + 1 if size % 2 == 0 else size


def antialias_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """kornia's `resize(..., interpolation="bicubic", align_corners=True, antialias=True)`: [B, C, H, W] -> [B, C, h, w]."""
    if x.ndim != 4:
        raise ValueError(f"antialias_resize expects [B, C, H, W], got shape {tuple(x.shape)}")
    in_h, in_w = x.shape[-2:]
    out_h, out_w = size
    if (in_h, in_w) == (out_h, out_w):
        return x
    dtype = x.dtype
    x = x.float()
    factor_h, factor_w = in_h / out_h, in_w / out_w
    if max(factor_h, factor_w) > 1:
        # Blur both sides as soon as one of them shrinks (an upscaled side gets sigma 0.001: a no-op).
        sigma_h = max((factor_h - 1.0) / 2.0, 0.001)
        sigma_w = max((factor_w - 1.0) / 2.0, 0.001)
        kernel_w = gaussian_kernel1d(_odd_kernel_size(sigma_w), sigma_w, device=x.device)
        kernel_h = gaussian_kernel1d(_odd_kernel_size(sigma_h), sigma_h, device=x.device)
        x = _blur_axis(_blur_axis(x, kernel_w, dim=-1), kernel_h, dim=-2)
    x = F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=True)
    return x.to(dtype)


def clip_preprocess(x: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    """Images in [-1, 1] [B, 3, H, W] -> CLIP pixels [B, 3, S, S] (resize, to [0, 1], normalise), as the official embedder."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    dtype = x.dtype
    x = antialias_resize(x.float(), size)
    x = (x + 1.0) / 2.0
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)
