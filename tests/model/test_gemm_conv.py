"""Convolutions as one GEMM on small CPU maps give the library convolution's result, and only run where asked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tooncrafter.model.cpu_prepack import PrepackedConv, prepack_available, prepack_convolutions
from tooncrafter.model.gemm_conv import GemmConv, conv2d_as_gemm, supports, use_gemm_convolutions

CASES = [
    (lambda: nn.Conv2d(16, 8, 3, padding=1), (3, 16, 4, 3)),
    (lambda: nn.Conv2d(16, 16, 3, stride=2, padding=1), (2, 16, 4, 4)),
    (lambda: nn.Conv2d(16, 16, 3, stride=2), (2, 16, 5, 3)),
    (lambda: nn.Conv2d(16, 8, 1), (2, 16, 2, 2)),
    (lambda: nn.Conv2d(16, 8, 3, padding=1, bias=False), (1, 16, 2, 2)),
    (lambda: nn.Conv3d(16, 12, (3, 1, 1), padding=(1, 0, 0)), (2, 16, 5, 2, 2)),
    (lambda: nn.Conv3d(16, 16, (3, 1, 1)), (1, 16, 4, 1, 3)),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make, shape", CASES)
def test_gemm_form_matches_the_library_convolution(make, shape, dtype):
    torch.manual_seed(0)
    conv = make().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    module = GemmConv(conv, max_pixels=10**6)
    with torch.no_grad():
        expected, got = conv(x).float(), module(x).float()
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOLERANCE[dtype] * expected.abs().max().item()


def test_the_function_agrees_with_conv2d_on_a_non_contiguous_input():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 3, 4).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(5, 6, 3, 3), torch.randn(5)
    got = conv2d_as_gemm(x, weight, bias, (1, 1), (1, 1))
    torch.testing.assert_close(got, F.conv2d(x, weight, bias, padding=1), rtol=1e-5, atol=1e-5)


def test_large_maps_run_the_library_convolution_bit_for_bit():
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 5, 5)  # 25 pixels > 16
    with torch.no_grad():
        assert torch.equal(GemmConv(conv, max_pixels=16)(x), conv(x))


def test_only_supported_convolutions_are_wrapped():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Sequential(nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))),
        nn.Conv3d(4, 4, 3, padding=1),  # a spatial 3D kernel: not ours
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(4, 4, 3, dilation=2),
        nn.Linear(4, 4),
    )
    assert use_gemm_convolutions(model) == 2
    assert isinstance(model[0], GemmConv) and isinstance(model[1][0], GemmConv)
    assert [type(m) for m in model[2:]] == [nn.Conv3d, nn.Conv2d, nn.Conv2d, nn.Linear]
    assert not supports(model[0])  # already wrapped: a second pass wraps nothing
    assert use_gemm_convolutions(model) == 0


@pytest.mark.skipif(not prepack_available(torch.bfloat16), reason="oneDNN has no bf16 convolution on this CPU")
def test_with_a_prepacked_fallback_both_paths_agree():
    """bf16 on CPU: small maps take the GEMM, large ones the packed weight; a packed layer keeps working."""
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 8, 3, padding=1).to(torch.bfloat16)
    small, large = torch.randn(2, 8, 2, 2, dtype=torch.bfloat16), torch.randn(1, 8, 6, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        expected_small, expected_large = conv(small).float(), conv(large).float()
        model = nn.Sequential(conv)
        use_gemm_convolutions(model, max_pixels=16)
        prepack_convolutions(model)
        assert isinstance(model[0].fallback, PrepackedConv)
        got_small = model(small).float()  # GEMM on the dense weight the fallback still holds
        got_large = model(large).float()  # packs, drops the dense weight
        got_small_after = model(small).float()  # now through the packed weight
    for got, expected in ((got_small, expected_small), (got_large, expected_large), (got_small_after, expected_small)):
        assert (got - expected).abs().max().item() <= TOLERANCE[torch.bfloat16] * expected.abs().max().item()


def test_the_dispatch_counts_output_pixels_and_keeps_temporal_convs_to_the_smallest_maps():
    strided = GemmConv(nn.Conv2d(4, 4, 3, stride=2, padding=1), max_pixels=4)
    assert strided._small(torch.zeros(1, 4, 4, 4))  # 4x4 in, 2x2 out
    assert not strided._small(torch.zeros(1, 4, 6, 6))  # 3x3 out
    temporal = GemmConv(nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0)), max_pixels=16)
    assert temporal._small(torch.zeros(1, 4, 5, 2, 2)) and not temporal._small(torch.zeros(1, 4, 5, 4, 4))
