"""The CPU attention: the same result as SDPA whichever form it picks, in pieces of bounded logits."""

from __future__ import annotations

import pytest
import torch

from tooncrafter.model import attention
from tooncrafter.model.attention import cpu_attention, math_attention, sdpa_attention

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
SHAPES = [  # (batch, query tokens, key tokens, heads, head dim)
    (6, 16, 16, 5, 8),  # temporal self-attention: few keys
    (3, 40, 40, 2, 16),
    (2, 70, 9, 4, 8),  # cross-attention, fewer keys than queries
    (1, 33, 130, 2, 8),  # more keys than the fp32 math limit
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_cpu_attention_matches_sdpa(shape, dtype, scale):
    torch.manual_seed(0)
    b, lq, lk, heads, d = shape
    q, k, v = torch.randn(b, lq, heads * d), torch.randn(b, lk, heads * d), torch.randn(b, lk, heads * d)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    got = cpu_attention(q, k, v, heads, scale)
    expected = sdpa_attention(q.float(), k.float(), v.float(), heads, scale)
    assert got.dtype == dtype and got.shape == (b, lq, heads * d)
    torch.testing.assert_close(got.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_the_logits_are_computed_in_pieces_within_the_budget(monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 24, 32), torch.randn(4, 12, 32), torch.randn(4, 12, 32)
    heads = 4
    products: list[tuple[int, ...]] = []
    real_bmm, real_baddbmm = torch.bmm, torch.baddbmm

    def counting_bmm(a, b, **kwargs):
        products.append(tuple(a.shape))
        return real_bmm(a, b, **kwargs)

    def counting_baddbmm(start, a, b, **kwargs):
        products.append(tuple(a.shape))
        return real_baddbmm(start, a, b, **kwargs)

    logits_bytes = 24 * 12 * 4  # one head's logits, fp32
    monkeypatch.setattr(attention, "CPU_LOGITS_BUDGET_BYTES", 3 * logits_bytes)
    monkeypatch.setattr(torch, "bmm", counting_bmm)
    monkeypatch.setattr(torch, "baddbmm", counting_baddbmm)
    got = cpu_attention(q, k, v, heads)
    monkeypatch.setattr(torch, "bmm", real_bmm)
    monkeypatch.setattr(torch, "baddbmm", real_baddbmm)
    # 16 heads in all, 3 per piece: 6 pieces, two products each; no piece above the budget
    assert len(products) == 12 and max(shape[0] for shape in products) == 3
    torch.testing.assert_close(got, math_attention(q, k, v, heads), rtol=1e-5, atol=1e-5)


def test_many_keys_in_fp32_and_other_devices_keep_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention", lambda *args: calls.append(args) or args[0])
    few, many = torch.randn(1, 8, 16), torch.randn(1, attention.CPU_FP32_MATH_MAX_KEYS + 1, 16)
    cpu_attention(few, many, many, 2)
    assert len(calls) == 1
    cpu_attention(few, few, few, 2)
    cpu_attention(few.bfloat16(), many.bfloat16(), many.bfloat16(), 2)
    assert len(calls) == 1


@pytest.mark.parametrize("keys", [4, 16, 32, 77, 256])
def test_low_precision_softmax_matches_fp32_whichever_kernel_runs_it(keys):
    """Short odd rows go through the fp32 kernel and back, the rest stay in bf16: either way the result is the fp32
    softmax rounded to bf16 (within one bf16 step), and fp32 input is untouched."""
    torch.manual_seed(0)
    logits = (torch.randn(64, 8, keys) * 4).bfloat16().float()  # exactly representable in bf16
    want = logits.softmax(dim=-1)
    got = attention._softmax_last(logits.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(attention._softmax_last(logits), want, rtol=0, atol=0)
