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


# How `specialise_for_cpu` treats a network's weights: packed copies for the network of every step, oneDNN on the
# weights where they lie for networks a request reads once or twice, or untouched (the UNet under torch.compile)
WEIGHT_HANDLING = ("packed", "in_place", "as_is")


def specialise_for_cpu(network: nn.Module, *, weights: str = "packed") -> None:
    """Give a loaded CPU network the attention that is faster there (`cpu_attention`) and, by `weights`:

    - "packed": oneDNN-packed convolutions and linears (`cpu_prepack.py`), tiny maps' convolutions as one GEMM
      (`gemm_conv.py`). A convolution whose weight is memory-mapped from the checkpoint (fp32, or a pre-converted
      bf16 file) reads it in place on tiny maps (`GemmConv`): those pages stay file pages that a request gives back
      before its decodes (a packed copy would stay on the heap: ~2.8 GB of the mid fp32 UNet). One on the heap (a
      converted copy) packs its GEMM matrix in `PrepackedConv` at no memory cost.
    - "in_place": only the fp32 linears and self-attentions on oneDNN reading their own weights (`InPlaceLinear`,
      `InPlaceSelfAttention`: no copy, so the pages a request gives back stay releasable).
    - "as_is": the layers untouched (for torch.compile).

    Inference only: packed layers cannot be trained or moved to another device.
    """
    if weights not in WEIGHT_HANDLING:
        raise ValueError(f"specialise_for_cpu: weights must be one of {WEIGHT_HANDLING}, got {weights!r}")
    if weights == "packed":
        mapped = MappedPages()  # one read of the process's mappings for every layer
        use_gemm_convolutions(
            network, only=lambda conv: mapped.holds(conv.weight) or not linear_prepack_available(conv.weight.dtype)
        )
        prepack_convolutions(network)  # every other convolution oneDNN runs: packed, tiny maps as one GEMM
        prepack_linears(network)  # packed now, GEGLUs fused
    if weights != "as_is":
        linears_in_place(network)  # what packing left (attention modules; all fp32 linears when not packing)
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
