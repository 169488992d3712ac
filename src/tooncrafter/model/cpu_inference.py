"""The CPU fast paths, put on a loaded network in one place: every network that runs on CPU gets the same ones."""

from __future__ import annotations

import functools

import torch
from torch import nn

from tooncrafter.model.attention import cpu_attention, set_attention_function
from tooncrafter.model.cpu_prepack import PrepackedConv, linears_in_place, prepack_convolutions, prepack_linears
from tooncrafter.model.gemm_conv import GemmConv, use_gemm_convolutions
from tooncrafter.model.mapped_pages import MappedPages
from tooncrafter.model.onednn import linear_prepack_available


def specialise_for_cpu(network: nn.Module, *, pack_weights: bool = True, in_place_linears: bool = True) -> None:
    """Give a loaded CPU network the attention that is faster there (`cpu_attention`) and, with `pack_weights`,
    oneDNN-packed convolutions and linears (`cpu_prepack.py`), tiny maps' convolutions as one GEMM (`gemm_conv.py`).

    A convolution whose weight is memory-mapped from the checkpoint (fp32, or a pre-converted bf16 file) reads it
    in place on tiny maps (`GemmConv`): those pages stay file pages that a request gives back before its decodes
    (a packed copy would stay on the heap: ~2.8 GB of the mid fp32 UNet). One on the heap (a converted copy)
    packs its GEMM matrix in `PrepackedConv` at no memory cost. With `in_place_linears`, the fp32 linears not packed
    run on oneDNN reading their own weight (`InPlaceLinear`: no copy, so for networks whose pages a request gives
    back). Inference only: packed layers cannot be trained or moved to another device.
    """
    if pack_weights:
        mapped = MappedPages()  # one read of the process's mappings for every layer
        use_gemm_convolutions(
            network, only=lambda conv: mapped.holds(conv.weight) or not linear_prepack_available(conv.weight.dtype)
        )
        prepack_convolutions(network)  # every other convolution oneDNN runs: packed, tiny maps as one GEMM
        prepack_linears(network)  # packed now, GEGLUs fused
    if in_place_linears:
        linears_in_place(network)  # the fp32 linears left (not packed): oneDNN on the weight where it lies
    set_attention_function(network, cpu_attention)  # batched products where they beat SDPA (attention.py)


def pack_for_input(network: nn.Module, meta_twin: nn.Module, *inputs: torch.Tensor) -> int:
    """Pack every `PrepackedConv` of a specialised `network` now for the input it will get when called on
    `inputs`, learnt by calling `meta_twin` (the same architecture on the `meta` device: no memory, no arithmetic);
    returns how many layers were packed.

    Packing is otherwise paid inside the first call (the first request's first step), and for the GEMM form it
    also takes fresh memory there; at load it is out of every request. An input of another shape later (a batch
    without guidance, several requests batched) packs again in its first call, as before.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        shapes[name] = tuple(args[0].shape)

    hooks = [
        module.register_forward_pre_hook(functools.partial(record, name))
        for name, module in meta_twin.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Conv3d))
    ]
    try:
        with torch.no_grad():
            meta_twin(*(t.to("meta") for t in inputs))
    finally:
        for hook in hooks:
            hook.remove()
    packed = 0
    for name, shape in shapes.items():
        layer = network.get_submodule(name)
        if isinstance(layer, GemmConv):
            if layer.small(shape):
                continue  # reads its weight in place there
            layer = layer.fallback
        if isinstance(layer, PrepackedConv):
            layer.pack_for(shape)
            packed += 1
    return packed
