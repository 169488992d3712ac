"""Convolutions and linear layers with oneDNN-prepacked weights, for inference on CPU.

An eager `nn.Conv2d` on CPU hands oneDNN a plain weight, which oneDNN reorders into its blocked layout on
every call; at the UNet's deep levels (1280-2560 channels on 2x2 to 4x4 pixels) that reorder costs more
than the convolution itself. Packing each weight once, for the input shape the layer actually sees, and
calling `mkldnn._convolution_pointwise` gives the same numbers (bit for bit in our checks) in less time:
bf16 on the mid UNet's shapes (Sapphire Rapids), 84 -> 39 ms ([32, 2560, 2, 2] x [1280, 2560, 3, 3]), 39 -> 23 ms
at 1280 x 4x4; fp32 on an AVX2 AMD EPYC (Zen 3), 3x3 convs 124 -> 105 ms (320 ch, 16x16, 32 frames) and
134 -> 91 ms (640 ch, 8x8), the temporal (3, 1, 1) convs 67 -> 54 and 57 -> 33 ms: one mid UNet call's
convolutions 7.3 -> 5.5 s there.

The dense weight is dropped once packed, and its pages given back if it was memory-mapped (so memory does not
double, although the packed copy then lives on the heap, not in the page cache): a prepacked module is for inference
only (no `state_dict` round trip, no `.to()` to another device). It packs lazily at its first call, and a
call with another input shape packs again for that shape. For output maps of at most `GEMM_MAX_PIXELS` pixels
it packs the weight as one GEMM's matrix instead (`gemm_conv.py`: 1.3-2.8x faster there).

Linear layers (fp32, and bf16 where oneDNN has bf16 kernels) are packed once, when they are replaced, since
their packing needs no input shape. PyTorch's fp32 `F.linear` calls MKL's sgemm; oneDNN on the packed weight took
0.75-0.98x its time at the mid UNet's shapes on an AVX2 AMD EPYC (Zen 3; interleaved, min of 5 rounds: `[32, 256, 320]` x 320 16.2 -> 13.5 ms,
`[32, 16, 1280]` x 10240 137.6 -> 102.8 ms; 0.85x summed over eleven shapes). One mid fp32 UNet call, alternating
in one process: 26.1-30.6 s -> 22.1-26.7 s, outputs within 9e-6. Packing the mid UNet's 452 linears (2.4 GB)
takes ~4.7 s, paid at load. PyTorch's bf16 `F.linear` runs oneDNN but reorders the weight inside every call:
packed, one mid bf16 UNet step took 3.66 s instead of 3.80 (min, alternating in one process on Zen 5, video
identical). A GEGLU becomes two packed linears with its GELU and product fused in (`PrepackedGEGLU`): one mid
bf16 step 3.71 s instead of 3.78 (min of 12, alternating in one process on Zen 5), and no `[rows, 2 * width]`
projection held.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tooncrafter.model.gemm_conv import GEMM_MAX_PIXELS, ConvGeometry, matmul, supports, weight_from_taps_outer, weight_taps_outer
from tooncrafter.model.mapped_pages import MappedPages
from tooncrafter.model.onednn import linear_prepack_available, prepack_available
from tooncrafter.model.transformer import GEGLU


class PrepackedConv(nn.Module):
    """A 2D or 3D convolution (no padding mode other than zeros) running on a oneDNN-packed weight: packed for
    oneDNN's convolution, or, on tiny output maps, as the matrix of one GEMM over the input's rows."""

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, mapped_pages: MappedPages | None = None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("prepack: only zero padding given as numbers is supported")
        self.dims = 2 if isinstance(conv, nn.Conv2d) else 3
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self._weight_shape = conv.weight.shape
        # the GEMM form where it applies and oneDNN multiplies this dtype
        self._geometry = ConvGeometry.of(conv) if supports(conv) and linear_prepack_available(conv.weight.dtype) else None
        # buffers (not saved): what `release_module_pages` and `buffers()` see until the weight is packed
        self.register_buffer("_dense", conv.weight.detach(), persistent=False)
        self.register_buffer("bias", conv.bias.detach() if conv.bias is not None else None, persistent=False)
        # the process's file mappings, read before this weight is packed; still right for it then, because the
        # weight's storage keeps its own mapping alive (`prepack_convolutions` reads them once for all layers)
        self._mapped_pages = mapped_pages if mapped_pages is not None else MappedPages()
        self._packed: torch.Tensor | None = None
        self._packed_for: tuple[int, ...] | None = None
        self._packed_as_gemm = False
        self._reorder = torch._C._nn.mkldnn_reorder_conv2d_weight if self.dims == 2 else torch._C._nn.mkldnn_reorder_conv3d_weight

    def _as_gemm(self, shape: tuple[int, ...]) -> bool:
        return self._geometry is not None and self._geometry.output_pixels(shape) <= GEMM_MAX_PIXELS

    def _pack(self, shape: tuple[int, ...]) -> None:
        as_gemm = self._as_gemm(shape)
        if not (as_gemm and self._packed_as_gemm):  # the GEMM's matrix is the same for every input shape
            dense = self._unpacked()
            if as_gemm:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight_taps_outer(dense))
            else:
                self._packed = self._reorder(dense.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, list(shape))
            self._packed_as_gemm = as_gemm
        self._packed_for = shape
        if self._dense is not None:
            # the packed copy is the weight from now on; a memory-mapped source would stay resident beside it
            self._mapped_pages.release(self._dense)
        self._dense = None

    def pack_for(self, shape: tuple[int, ...]) -> None:
        """Pack now for inputs of `shape` (what the first call with that shape would do)."""
        if tuple(shape) != self._packed_for:
            self._pack(tuple(shape))

    def _unpacked(self) -> torch.Tensor:
        """The plain weight: the one given, or a copy unpacked from the packed form."""
        if self._dense is not None:
            return self._dense
        if self._packed_as_gemm:
            return weight_from_taps_outer(self._packed.to_dense(), self._weight_shape)
        return self._packed.to_dense()

    @property
    def dense_weight(self) -> torch.Tensor | None:
        """The plain weight until the first call packs it (then None: the packed copy is the only one)."""
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pack_for(tuple(x.shape))
        if self._packed_as_gemm:
            return self._geometry.run(x, self._packed, self.bias, taps_outer=True)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], ""
        )

    def extra_repr(self) -> str:
        form = ", as one GEMM" if self._packed_as_gemm else ""
        return f"{self.in_channels}, {self.out_channels}, {self.dims}d, packed_for={self._packed_for}{form}"


def _replace_children(root: nn.Module, wanted: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]) -> int:
    """Put `make(child)` in place of every child under `root` that is `wanted`; returns how many."""
    replaced = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if wanted(child):
                setattr(parent, name, make(child))
                replaced += 1
    return replaced


def prepack_convolutions(root: nn.Module) -> int:
    """Replace every CPU Conv2d/Conv3d under `root` whose dtype oneDNN runs here (`prepack_available`) by a
    `PrepackedConv`; returns how many were replaced."""
    return _replace_children(
        root,
        lambda child: type(child) in (nn.Conv2d, nn.Conv3d) and child.weight.device.type == "cpu"
        and child.padding_mode == "zeros" and prepack_available(child.weight.dtype),
        functools.partial(PrepackedConv, mapped_pages=MappedPages()),  # one read of the mappings for all layers
    )


def _pack_linear_rows(
    linear: nn.Linear, rows: list[slice], mapped_pages: MappedPages | None
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The oneDNN-packed weight and the bias of each row range of `linear`; the dense weight's mapped pages are
    given back (the packed copies replace it)."""
    dense = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    packed = [torch.ops.mkldnn._reorder_linear_weight(dense[r].contiguous()) for r in rows]
    (mapped_pages if mapped_pages is not None else MappedPages()).release(dense)
    return packed, [bias[r].contiguous() if bias is not None else None for r in rows]


class PrepackedLinear(nn.Module):
    """An `nn.Linear` running on a oneDNN-packed copy of its weight (the dense weight is not kept)."""

    def __init__(self, linear: nn.Linear, mapped_pages: MappedPages | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        (self._packed,), (bias,) = _pack_linear_rows(linear, [slice(None)], mapped_pages)
        self.register_buffer("bias", bias, persistent=False)

    @property
    def dense_weight(self) -> torch.Tensor:
        """The weight as a plain `[out, in]` tensor (a copy): for tests and inspection."""
        return self._packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x.contiguous(), self._packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


class PrepackedGEGLU(nn.Module):
    """A `GEGLU` (`a * gelu(g)`, `a, g = proj(x).chunk(2)`) as two packed linears with the activation fused in:
    `g` with oneDNN's exact GELU applied on output, then `a` with the multiply by it applied on output. The
    `[rows, 2 * width]` projection, its GELU pass and the product pass are gone (their memory traffic too)."""

    def __init__(self, geglu: GEGLU, mapped_pages: MappedPages | None = None) -> None:
        super().__init__()
        width = geglu.proj.out_features // 2
        self.in_features, self.out_features = geglu.proj.in_features, width
        halves = [slice(None, width), slice(width, None)]  # `a` then `g`, as `chunk(2)` splits them
        (self._value, self._gate), (value_bias, gate_bias) = _pack_linear_rows(geglu.proj, halves, mapped_pages)
        self.register_buffer("value_bias", value_bias, persistent=False)
        self.register_buffer("gate_bias", gate_bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        gate = torch.ops.mkldnn._linear_pointwise(x, self._gate, self.gate_bias, "gelu", [], "none")  # exact erf
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, self._value, self.value_bias, "mul")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed, gelu and product fused"


class InPlaceLinear(nn.Module):
    """An fp32 `nn.Linear` multiplied by oneDNN on its own plain weight, which it keeps (a memory-mapped weight stays
    a file page that `release_module_pages` can give back; no packed copy on the heap). For the networks that run
    once or twice a request (CLIP towers, Resampler, VAE): PyTorch's fp32 `F.linear` calls MKL's sgemm, which takes
    its generic path on AMD EPYC. Zen 5, 2 threads, median of 30: `[257, 1280]` x 5120 28.1 -> 11.8 ms (packed 11.5),
    `[256, 1024]` x 4096 19.4 -> 7.5, `[513, 1024]` x 1536 8.3 -> 4.0; outputs within 3e-4 (another summation order)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same parameters: state_dict keys and mapped pages unchanged
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x.contiguous(), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, oneDNN in place"


class InPlaceSelfAttention(nn.Module):
    """A sequence-first fp32 `nn.MultiheadAttention` used as self-attention (the CLIP towers' blocks), with its two
    projections on oneDNN in place (as `InPlaceLinear`) and the attention itself on SDPA. The parameters are the
    module's own (same names: `in_proj_weight`, `in_proj_bias`, `out_proj.*`). Zen 5, 2 threads: the image tower's
    `[257, 1280]` x 3840 input projection 20.9 -> 9.9 ms."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = attention.embed_dim, attention.num_heads
        self.in_proj_weight, self.in_proj_bias = attention.in_proj_weight, attention.in_proj_bias
        self.out_proj = InPlaceLinear(attention.out_proj)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """query = key = value `[L, B, D]`; `attn_mask` additive `[L, L]` (or None) -> (`[L, B, D]`, None)."""
        if key is not query or value is not query or need_weights:
            raise ValueError("InPlaceSelfAttention: self-attention without attention weights only")
        length, batch, width = query.shape
        heads = self.num_heads
        qkv = matmul(query.contiguous(), self.in_proj_weight, self.in_proj_bias)
        # [L, B, 3 D] -> 3 x [B, heads, L, d]
        q, k, v = qkv.view(length, batch, 3, heads, width // heads).permute(2, 1, 3, 0, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, heads, L, d]
        out = out.permute(2, 0, 1, 3).reshape(length, batch, width)
        return self.out_proj(out), None


def _in_place_self_attention(child: nn.Module) -> bool:
    return (
        type(child) is nn.MultiheadAttention and not child.batch_first and child._qkv_same_embed_dim
        and child.in_proj_weight.device.type == "cpu" and child.in_proj_weight.dtype == torch.float32
        and child.bias_k is None and not child.add_zero_attn and child.dropout == 0.0
        and linear_prepack_available(torch.float32)
    )


def linears_in_place(root: nn.Module) -> int:
    """Replace every CPU fp32 `nn.Linear` under `root` by an `InPlaceLinear`, and every sequence-first fp32
    `nn.MultiheadAttention` by an `InPlaceSelfAttention`, where oneDNN runs fp32 products here; returns how many
    modules were replaced. Other `nn.Linear` subclasses stay."""
    attentions = _replace_children(root, _in_place_self_attention, InPlaceSelfAttention)
    return attentions + _replace_children(root, _fp32_linear, InPlaceLinear)


def _packable_linear(child: nn.Module) -> bool:
    return type(child) is nn.Linear and child.weight.device.type == "cpu" and linear_prepack_available(child.weight.dtype)


def _fp32_linear(child: nn.Module) -> bool:
    return _packable_linear(child) and child.weight.dtype == torch.float32


def prepack_linears(root: nn.Module) -> int:
    """Replace every CPU `GEGLU` (by a `PrepackedGEGLU`) and then every CPU `nn.Linear` (by a `PrepackedLinear`)
    under `root` whose dtype is packed here (`linear_prepack_available`), packing the weights now; returns how
    many modules were replaced."""
    mapped = MappedPages()  # one read of the process's mappings for all the layers
    geglus = _replace_children(
        root, lambda child: type(child) is GEGLU and _packable_linear(child.proj), lambda child: PrepackedGEGLU(child, mapped)
    )
    return geglus + _replace_children(root, _packable_linear, lambda child: PrepackedLinear(child, mapped))


def reference_convolution(module: PrepackedConv, x: torch.Tensor) -> torch.Tensor:
    """The same convolution by `F.conv2d`/`F.conv3d` on the (unpacked) weight: for tests."""
    weight = module._unpacked()
    conv = F.conv2d if module.dims == 2 else F.conv3d
    return conv(x, weight, module.bias, module.stride, module.padding, module.dilation, module.groups)
