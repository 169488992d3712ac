"""oneDNN-prepacked convolutions and linears give the plain layer's result, for any input shape they meet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import resident
from tooncrafter.model.cpu_prepack import (
    PrepackedConv,
    PrepackedLinear,
    linear_prepack_available,
    prepack_available,
    prepack_convolutions,
    prepack_linears,
)
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


def test_prepack_linears_replaces_float32_linears_only_and_keeps_the_model_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 8, bias=False)), nn.Conv2d(8, 8, 1))
    model.append(nn.Linear(8, 8).to(torch.bfloat16))
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model[2](model[1](model[0](x)))
        assert prepack_linears(model) == 2  # not the conv, not the bf16 linear
        assert isinstance(model[0], PrepackedLinear) and isinstance(model[2][0], PrepackedLinear)
        assert type(model[3]) is nn.Conv2d and type(model[4]) is nn.Linear
        torch.testing.assert_close(model[2](model[1](model[0](x))), expected, rtol=1e-5, atol=1e-5)
    assert not linear_prepack_available(torch.bfloat16)


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
