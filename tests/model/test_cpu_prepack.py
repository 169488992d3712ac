"""oneDNN-prepacked convolutions and linears give the plain layer's result, for any input shape they meet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import resident
from tooncrafter.model.cpu_prepack import (
    PrepackedConv,
    PrepackedGEGLU,
    PrepackedLinear,
    prepack_convolutions,
    prepack_linears,
)
from tooncrafter.model.onednn import linear_prepack_available, prepack_available
from tooncrafter.model.transformer import GEGLU, FeedForward
from tooncrafter.model.vae_blocks import VideoConv2d

pytestmark = pytest.mark.skipif(not prepack_available(), reason="oneDNN is not available in this torch build")

CASES = [
    (lambda: nn.Conv2d(16, 8, 3, padding=1), (3, 16, 6, 5)),
    (lambda: nn.Conv2d(16, 16, 3, stride=2), (2, 16, 9, 7)),
    (lambda: nn.Conv2d(16, 8, 1), (2, 16, 4, 4)),
    (lambda: nn.Conv3d(16, 16, (3, 1, 1), padding=(1, 0, 0)), (2, 16, 5, 3, 3)),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
NO_ONEDNN_BF16 = "oneDNN has no bf16 convolution on this CPU (it needs AVX-512 or AVX-NE-CONVERT)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make, shape", CASES)
def test_prepacked_matches_the_plain_convolution(make, shape, dtype):
    if not prepack_available(dtype):
        pytest.skip(NO_ONEDNN_BF16)
    torch.manual_seed(0)
    conv = make().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    packed = PrepackedConv(conv)
    with torch.no_grad():
        expected = conv(x).float()
        got = packed(x).float()
        # another batch size: packed again for that shape, still the same convolution
        smaller = x[:1]
        got_small, expected_small = packed(smaller).float(), conv(smaller).float()
    scale = expected.abs().max().item()
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOLERANCE[dtype] * scale
    assert (got_small - expected_small).abs().max().item() <= TOLERANCE[dtype] * scale


def test_prepack_replaces_plain_convolutions_only():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Sequential(nn.Conv3d(4, 4, 1)), VideoConv2d(4, 4), nn.Linear(4, 4))
    assert prepack_convolutions(model) == 3  # the two plain ones and the time_mix_conv inside VideoConv2d
    assert isinstance(model[0], PrepackedConv) and isinstance(model[1][0], PrepackedConv)
    assert type(model[2]) is VideoConv2d and isinstance(model[2].time_mix_conv, PrepackedConv)
    assert isinstance(model[3], nn.Linear)


def test_convolutions_of_a_dtype_onednn_cannot_run_here_stay_as_they_are():
    """bf16 layers are packed only where this CPU's oneDNN runs bf16; elsewhere they keep PyTorch's kernels."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1).to(torch.bfloat16))
    bf16_packs = prepack_available(torch.bfloat16)
    assert prepack_convolutions(model) == 1 + bf16_packs
    assert isinstance(model[0], PrepackedConv)
    assert isinstance(model[1], PrepackedConv) == bf16_packs
    x = torch.randn(1, 4, 5, 5, dtype=torch.bfloat16)
    with torch.no_grad():
        assert model[1](x).shape == (1, 4, 5, 5)  # runs either way


@pytest.mark.skipif(not resident.AVAILABLE, reason="/proc/self/pagemap is Linux")
def test_packing_gives_back_a_memory_mapped_weight(tmp_path):
    """The packed copy replaces the weight: a memory-mapped source leaves memory once packed, not twice resident."""
    torch.manual_seed(0)
    torch.save(nn.Conv2d(64, 64, 3, padding=1).state_dict(), tmp_path / "conv.ckpt")
    conv = nn.Conv2d(64, 64, 3, padding=1)
    conv.load_state_dict(torch.load(tmp_path / "conv.ckpt", mmap=True, weights_only=True), assign=True)
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        expected = conv(x)  # reads the mapped weight: its pages are present now
        weight = conv.weight
        total, present = resident.whole_pages(weight)
        assert total > 0 and present == total
        model = nn.Sequential(conv)
        prepack_convolutions(model)
        got = model(x)  # packs, then gives the mapped pages back
    assert resident.whole_pages(weight)[1] == 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_prepacked_linear_matches_the_plain_linear_on_any_leading_shape(bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 40, bias=bias)
    packed = PrepackedLinear(linear)
    with torch.no_grad():
        for shape in [(7, 48), (2, 5, 48), (3, 2, 4, 48), (1, 48)]:
            x = torch.randn(shape)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        strided = torch.randn(6, 48, 5).transpose(1, 2)  # not contiguous: [6, 5, 48]
        torch.testing.assert_close(packed(strided), linear(strided), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.dense_weight, linear.weight.detach())
    assert (packed.bias is None) == (not bias)


def test_prepack_linears_packs_the_linears_of_dtypes_onednn_runs_here_and_keeps_the_model_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 8, bias=False)), nn.Conv2d(8, 8, 1))
    model.append(nn.Linear(8, 8).to(torch.bfloat16))
    x = torch.randn(3, 8)
    bf16_packs = prepack_available(torch.bfloat16)
    with torch.no_grad():
        expected = model[2](model[1](model[0](x)))
        expected_bf16 = model[4](x.to(torch.bfloat16))
        assert prepack_linears(model) == 2 + bf16_packs  # never the conv; the bf16 linear where oneDNN runs bf16
        assert isinstance(model[0], PrepackedLinear) and isinstance(model[2][0], PrepackedLinear)
        assert type(model[3]) is nn.Conv2d
        assert isinstance(model[4], PrepackedLinear) == bf16_packs
        torch.testing.assert_close(model[2](model[1](model[0](x))), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[4](x.to(torch.bfloat16)), expected_bf16, **BF16_LINEAR_TOLERANCE)
    assert linear_prepack_available(torch.bfloat16) == bf16_packs
    assert not linear_prepack_available(torch.float16)


BF16_LINEAR_TOLERANCE = {"rtol": 2e-2, "atol": 2e-2}


@pytest.mark.skipif(not prepack_available(torch.bfloat16), reason="oneDNN has no bf16 kernels on this CPU")
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_bf16_linear_matches_the_plain_one(bias):
    torch.manual_seed(0)
    linear = nn.Linear(320, 1280, bias=bias).to(torch.bfloat16)
    packed = PrepackedLinear(linear)
    with torch.no_grad():
        for shape in [(64, 320), (2, 37, 320)]:
            x = torch.randn(shape, dtype=torch.bfloat16)
            got, expected = packed(x), linear(x)
            assert got.dtype == torch.bfloat16 and got.shape == expected.shape
            torch.testing.assert_close(got, expected, **BF16_LINEAR_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_a_fused_geglu_matches_the_plain_one(dtype, bias):
    if not linear_prepack_available(dtype):
        pytest.skip("oneDNN has no linear kernels of this dtype on this CPU")
    torch.manual_seed(0)
    geglu = GEGLU(48, 40)
    if not bias:
        geglu.proj = nn.Linear(48, 80, bias=False)
    geglu = geglu.to(dtype)
    fused = PrepackedGEGLU(geglu)
    with torch.no_grad():
        for shape in [(7, 48), (2, 5, 48), (3, 2, 4, 48)]:
            x = torch.randn(shape, dtype=dtype)
            got, expected = fused(x), geglu(x)
            assert got.dtype == dtype and got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
        strided = torch.randn(6, 48, 5, dtype=dtype).transpose(1, 2)
        torch.testing.assert_close(fused(strided), geglu(strided), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_prepack_linears_fuses_the_geglus_and_packs_the_other_linears():
    torch.manual_seed(0)
    model = nn.Sequential(FeedForward(16), nn.Linear(16, 16))
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = model(x)
        assert prepack_linears(model) == 3  # the GEGLU as one module, the FeedForward's output linear, the last one
        assert isinstance(model[0].net[0], PrepackedGEGLU)
        assert isinstance(model[0].net[2], PrepackedLinear) and isinstance(model[1], PrepackedLinear)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not resident.AVAILABLE, reason="/proc/self/pagemap is Linux")
def test_packing_a_linear_gives_back_its_memory_mapped_weight(tmp_path):
    torch.manual_seed(0)
    torch.save(nn.Linear(512, 512).state_dict(), tmp_path / "linear.ckpt")
    linear = nn.Linear(512, 512)
    linear.load_state_dict(torch.load(tmp_path / "linear.ckpt", mmap=True, weights_only=True), assign=True)
    x = torch.randn(4, 512)
    with torch.no_grad():
        expected = linear(x)
        weight = linear.weight
        assert resident.whole_pages(weight)[1] == resident.whole_pages(weight)[0] > 0
        packed = PrepackedLinear(linear)
        assert resident.whole_pages(weight)[1] == 0
        torch.testing.assert_close(packed(x), expected, rtol=1e-5, atol=1e-5)
