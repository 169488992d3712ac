"""`--compile`: torch.compile (inductor, C++ kernels on the CPU) of the UNet gives the eager result.

Inductor's compile time grows with the number of blocks, not their width, so the check runs on a
UNet with the fixture config's widths and conditioning but one resolution level fewer blocks: every
kind of block the full UNet has (ResBlock, temporal conv, spatial transformer with text and image
cross-attention, temporal attention, down/up-sampling, fs embedding) still goes through the compiler.
"""

from __future__ import annotations

import dataclasses

import torch

from tooncrafter.model.unet import UNet3D
from tooncrafter.pipeline import ToonCrafterPipeline


def _small_unet(fixture_set) -> UNet3D:
    config = fixture_set.config
    levels = config.unet.channel_mult[:2]
    small = dataclasses.replace(config.unet, channel_mult=levels, num_res_blocks=1, attention_resolutions=(1, 2))
    torch.manual_seed(0)
    return UNet3D(small, image_tokens_per_frame=config.resampler.num_queries).eval()


def test_compiled_unet_matches_eager(fixture_set) -> None:
    unet = _small_unet(fixture_set)
    f = fixture_set
    x = torch.cat([f["unet_x_noisy"], f["unet_c_concat"]], dim=1)
    args = (x, f["unet_timesteps"], f["unet_context"], f["unet_fs"])
    with torch.no_grad():
        eager = unet(*args)
        unet.compile(dynamic=False)
        compiled = unet(*args)
    assert eager.abs().max().item() > 0  # a real output, not zeros on both sides
    assert (compiled - eager).abs().max().item() <= 1e-4 * max(1.0, eager.abs().max().item())


def test_from_pretrained_compile_compiles_the_unet_module(fixture_set) -> None:
    """`compile=True` uses `Module.compile` on the UNet (forward stays the class's own method)."""
    plain = ToonCrafterPipeline.from_pretrained(fixture_set.directory, device="cpu", dtype="float32", progress=False)
    assert plain.components.unet._compiled_call_impl is None
    compiled = ToonCrafterPipeline.from_pretrained(
        fixture_set.directory, device="cpu", dtype="float32", compile=True, progress=False
    )
    unet = compiled.components.unet
    assert unet._compiled_call_impl is not None
    assert "forward" not in vars(unet)
