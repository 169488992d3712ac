"""Convolutions as one GEMM on small CPU maps give the library convolution's result, and only run where asked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tooncrafter.model.cpu_prepack import PrepackedConv, prepack_convolutions
from tooncrafter.model.gemm_conv import (
    GEMM_MAX_PIXELS,
    ConvGeometry,
    GemmConv,
    conv2d_as_gemm,
    supports,
    use_gemm_convolutions,
    weight_from_taps_outer,
    weight_taps_outer,
)
from tooncrafter.model.onednn import linear_prepack_available, prepack_available

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


def test_the_dispatch_counts_output_pixels_of_a_frame():
    strided = GemmConv(nn.Conv2d(4, 4, 3, stride=2, padding=1), max_pixels=4)
    assert strided.small((1, 4, 4, 4))  # 4x4 in, 2x2 out
    assert not strided.small((1, 4, 6, 6))  # 3x3 out
    temporal = GemmConv(nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0)), max_pixels=16)
    assert temporal.small((1, 4, 5, 4, 4)) and not temporal.small((1, 4, 5, 4, 5))


@pytest.mark.parametrize("make, shape", CASES)
def test_both_row_orders_give_the_convolution_with_their_weight_layout(make, shape):
    """Taps outer with the reordered weight, channels outer with the weight as it is: both are the convolution,
    and the reordered weight goes back to the plain one exactly."""
    torch.manual_seed(4)
    conv = make()
    geometry, weight, x = ConvGeometry.of(conv), conv.weight.detach(), torch.randn(shape)
    with torch.no_grad():
        expected = conv(x)
        for taps_outer, matrix in ((True, weight_taps_outer(weight)), (False, weight.reshape(weight.shape[0], -1))):
            product = geometry.rows(x, taps_outer) @ matrix.t()
            got = geometry.output(product + conv.bias if conv.bias is not None else product, x)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(weight_from_taps_outer(weight_taps_outer(weight), weight.shape), weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make, shape", CASES)
def test_a_packed_convolution_runs_tiny_maps_as_one_gemm_and_switches_forms_with_the_input(make, shape, dtype):
    """`PrepackedConv` packs a GEMM matrix for tiny output maps and oneDNN's convolution weight for the others,
    unpacking one form to make the other: each input gets the library convolution's result."""
    if not linear_prepack_available(dtype):
        pytest.skip("oneDNN runs no products of this dtype on this CPU")
    torch.manual_seed(5)
    conv = make().to(dtype)
    packed = PrepackedConv(conv)
    small = torch.randn(shape, dtype=dtype)
    large = torch.randn(*shape[:-2], 13, 13, dtype=dtype)  # >= 36 output pixels a frame: more than GEMM_MAX_PIXELS
    assert packed._geometry.output_pixels(small.shape) <= GEMM_MAX_PIXELS < packed._geometry.output_pixels(large.shape)
    with torch.no_grad():
        for x, as_gemm in ((small, True), (large, False), (small, True)):
            got, expected = packed(x).float(), conv(x).float()
            assert packed._packed_as_gemm == as_gemm and packed.dense_weight is None
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() <= TOLERANCE[dtype] * expected.abs().max().item()


def test_the_dense_gemm_form_runs_on_onednn_where_it_multiplies_the_dtype():
    """The in-place form's product is oneDNN's where it runs the dtype (MKL's fp32 GEMM is slow on AMD EPYC)."""
    conv = GemmConv(nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        conv(x)
    names = {event.key for event in prof.key_averages()}
    assert ("mkldnn::_linear_pointwise" in names) == linear_prepack_available(torch.float32)
    assert ("aten::addmm" in names) != linear_prepack_available(torch.float32)
