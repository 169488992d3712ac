"""The CPU specialisation of a network: which form each convolution takes, and packing at load for a known input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tooncrafter.model.attention import cpu_attention
from tooncrafter.model.cpu_inference import pack_for_input, specialise_for_cpu
from tooncrafter.model.cpu_prepack import InPlaceLinear, InPlaceSelfAttention, PrepackedConv, PrepackedLinear, linears_in_place
from tooncrafter.model.gemm_conv import GemmConv
from tooncrafter.model.onednn import linear_prepack_available
from tooncrafter.model.transformer import SpatialTransformer

pytestmark = pytest.mark.skipif(not linear_prepack_available(), reason="oneDNN is not available in this torch build")


def _network() -> nn.Sequential:
    # 8x8 in: the first conv sees 64 pixels (oneDNN's convolution), the strided and 1x1 ones 16 (one GEMM)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 6, 1))


def test_packing_for_a_known_input_leaves_nothing_to_pack_in_the_call_and_keeps_the_result():
    torch.manual_seed(0)
    network = _network()
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        expected = network(x)
        specialise_for_cpu(network)
        with torch.device("meta"):
            twin = _network()
        assert pack_for_input(network, twin, torch.empty(x.shape, device="meta")) == 3
        convs = [m for m in network.modules() if isinstance(m, PrepackedConv)]
        assert [m._packed_as_gemm for m in convs] == [False, True, True]
        before = [m._packed_for for m in convs]
        got = network(x)
    assert before == [m._packed_for for m in convs] == [(3, 4, 8, 8), (3, 8, 8, 8), (3, 8, 4, 4)]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_memory_mapped_weight_is_read_in_place_on_tiny_maps_and_a_heap_one_is_packed(tmp_path):
    torch.manual_seed(1)
    torch.save(_network().state_dict(), tmp_path / "network.ckpt")
    mapped, heap = _network(), _network()
    mapped.load_state_dict(torch.load(tmp_path / "network.ckpt", mmap=True, weights_only=True), assign=True)
    heap.load_state_dict(torch.load(tmp_path / "network.ckpt", weights_only=True))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = heap(x)
        for network in (mapped, heap):
            specialise_for_cpu(network)
            torch.testing.assert_close(network(x), expected, rtol=1e-5, atol=1e-5)
    assert all(isinstance(m, GemmConv) for m in (mapped[0], mapped[2], mapped[3]))
    assert not any(isinstance(m, GemmConv) for m in heap.modules())
    assert mapped[3].fallback.dense_weight is not None  # never packed: the mapped pages stay the weight
    assert heap[3]._packed_as_gemm


def test_attention_is_the_cpu_form_with_or_without_packing():
    kinds = {"packed": PrepackedLinear, "in_place": InPlaceLinear, "as_is": nn.Linear}
    for weights, kind in kinds.items():
        block = SpatialTransformer(32, heads=2, head_dim=16, context_dim=8)
        specialise_for_cpu(block, weights=weights)
        layers = [m for m in block.modules() if hasattr(m, "attention_fn")]
        assert layers and all(m.attention_fn is cpu_attention for m in layers)
        # packed, else on oneDNN in place, else left as they are (for torch.compile)
        linears = [type(m) for m in block.modules() if type(m) in kinds.values()]
        assert linears and set(linears) == {kind}, weights
    with pytest.raises(ValueError, match="weights"):
        specialise_for_cpu(block, weights="packd")


@pytest.mark.skipif(not linear_prepack_available(torch.float32), reason="oneDNN fp32 products not available")
def test_in_place_linears_keep_their_weight_and_match_nn_linear():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8, bias=False), nn.Linear(8, 8).bfloat16())
    weights = [m.weight for m in block if isinstance(m, nn.Linear)]
    x = torch.randn(3, 5, 24)
    want = block[:3](x)
    keys = set(block.state_dict())
    specialise_for_cpu(block, weights="in_place")
    assert [type(m) for m in block] == [InPlaceLinear, nn.GELU, InPlaceLinear, nn.Linear]  # bf16 stays nn.Linear
    assert block[0].weight is weights[0] and block[2].weight is weights[1]  # no copy: mapped pages stay releasable
    assert set(block.state_dict()) == keys
    torch.testing.assert_close(block[:3](x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block[:3](x.transpose(0, 1)), want.transpose(0, 1), rtol=1e-5, atol=1e-5)  # strided in


@pytest.mark.skipif(not linear_prepack_available(torch.float32), reason="oneDNN fp32 products not available")
@pytest.mark.parametrize("causal", [False, True])
def test_in_place_self_attention_matches_multihead_attention(causal):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(48, 4, batch_first=False).eval()
    reference = holder.attn
    keys, weight = set(holder.state_dict()), reference.in_proj_weight
    x = torch.randn(9, 3, 48)  # [L, B, D], sequence first as the CLIP towers run it
    mask = torch.full((9, 9), float("-inf")).triu_(1) if causal else None
    want = reference(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert linears_in_place(holder) == 1
    assert isinstance(holder.attn, InPlaceSelfAttention) and holder.attn.in_proj_weight is weight
    assert set(holder.state_dict()) == keys  # the same parameter names
    got, weights = holder.attn(x, x, x, need_weights=False, attn_mask=mask)
    assert weights is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="self-attention"):
        holder.attn(x, x.clone(), x)


def test_batch_first_or_low_precision_attention_stays_as_it_is():
    holder = nn.Module()
    holder.first = nn.MultiheadAttention(16, 2, batch_first=True)
    holder.bf16 = nn.MultiheadAttention(16, 2).bfloat16()
    assert linears_in_place(holder) == 0
    assert type(holder.first) is nn.MultiheadAttention and type(holder.bf16) is nn.MultiheadAttention
