"""3D UNet: parity with the official fixtures, the full-size key set, and invariants (batching, dtype, context)."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest
import torch

from tooncrafter.fixtures import (
    DEFAULT_FIXTURES,
    FixtureSet,
    compare,
    fixtures_dir_from_env,
)
from tooncrafter.model.attention import (
    math_attention,
    sdpa_attention,
    set_attention_function,
)
from tooncrafter.model.checkpoint import (
    PREFIXES,
    component_state_dict,
    load_into,
    read_state_dict,
)
from tooncrafter.model.config import builtin_config
from tooncrafter.model.transformer import Attention, FrameContext
from tooncrafter.model.unet import UNet3D

STATE_DICT_LISTING = DEFAULT_FIXTURES.parent / "tooncrafter_512_state_dict.json.gz"


@pytest.fixture(scope="module")
def fixtures() -> FixtureSet:
    directory = fixtures_dir_from_env()
    if not (Path(directory) / "fixtures.safetensors").is_file():
        pytest.skip(f"no fixture set at {directory}")
    fx = FixtureSet.load(directory)
    if not fx.has("unet_x_noisy", "unet_c_concat", "unet_timesteps", "unet_context", "unet_fs", "unet_out"):
        pytest.skip(f"{directory} has no UNet fixtures")
    return fx


@pytest.fixture(scope="module")
def unet(fixtures: FixtureSet) -> UNet3D:
    with torch.device("meta"):
        model = UNet3D(fixtures.config.unet, image_tokens_per_frame=fixtures.config.resampler.num_queries)
    state = component_state_dict(read_state_dict(fixtures.checkpoint_path), "unet")
    return load_into(model, state, "unet")


def _inputs(fx: FixtureSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.cat([fx["unet_x_noisy"], fx["unet_c_concat"]], dim=1)  # noisy latent first
    return x, fx["unet_timesteps"], fx["unet_context"], fx["unet_fs"]


@torch.no_grad()
def test_unet_parity(unet: UNet3D, fixtures: FixtureSet) -> None:
    x, t, context, fs = _inputs(fixtures)
    result = compare("unet_out", unet(x, t, context, fs), fixtures["unet_out"])
    assert result.passed, result


@torch.no_grad()
def test_unet_parity_default_fs(unet: UNet3D, fixtures: FixtureSet) -> None:
    if not fixtures.has("unet_out_fs_default_batch1"):
        pytest.skip("no unet_out_fs_default_batch1")
    x, t, context, _ = _inputs(fixtures)
    out = unet(x[1:2], t[1:2], context[1:2], None)
    result = compare("unet_out_fs_default_batch1", out, fixtures["unet_out_fs_default_batch1"])
    assert result.passed, result


@torch.no_grad()
def test_unet_math_attention_matches_sdpa(unet: UNet3D, fixtures: FixtureSet) -> None:
    x, t, context, fs = _inputs(fixtures)
    reference = unet(x, t, context, fs)
    set_attention_function(unet, math_attention)
    try:
        swapped = unet(x, t, context, fs)
    finally:
        set_attention_function(unet, sdpa_attention)
    assert compare("math_attention", swapped, reference).passed


@torch.no_grad()
def test_unet_batched_equals_single(unet: UNet3D, fixtures: FixtureSet) -> None:
    x, t, context, fs = _inputs(fixtures)
    batched = unet(x, t, context, fs)
    scale = float(batched.abs().max())
    for i in range(x.shape[0]):
        single = unet(x[i : i + 1], t[i : i + 1], context[i : i + 1], fs[i : i + 1])
        err = float((single - batched[i : i + 1]).abs().max())
        assert err <= 1e-4 * (1 + scale), f"batch element {i}: {err}"


@torch.no_grad()
def test_unet_per_frame_context_matches_shared_context(unet: UNet3D, fixtures: FixtureSet) -> None:
    """Per-frame image tokens that are the same for every frame equal one shared image context."""
    x, t, context, fs = _inputs(fixtures)
    num_frames = x.shape[2]
    text_len, per_frame = unet.text_context_len, unet.image_tokens_per_frame
    assert context.shape[1] == text_len + per_frame * num_frames, "fixture context is not per-frame"
    shared = context[:, : text_len + per_frame]  # text + the first frame's image tokens
    repeated = torch.cat([shared[:, :text_len], shared[:, text_len:].repeat(1, num_frames, 1)], dim=1)
    out_shared = unet(x, t, shared, fs)
    out_repeated = unet(x, t, repeated, fs)
    assert compare("shared_context", out_repeated, out_shared).passed
    assert not compare("per_frame_context", unet(x, t, context, fs), out_shared).passed


@pytest.mark.parametrize("attention_fn", [sdpa_attention, math_attention])
@pytest.mark.parametrize("image_per_frame", [True, False])
@torch.no_grad()
def test_text_projected_once_per_video_equals_the_per_frame_copies(attention_fn, image_per_frame) -> None:
    """A `FrameContext` (text keys/values once per video, queries of all frames as one sequence) gives what the
    official per-frame copy of the context gives, with image tokens per frame or shared."""
    torch.manual_seed(0)
    videos, frames, queries, text_len, image_len, width = 2, 5, 6, 7, 3, 32
    attention = Attention(width, 4, 8, 24, image_cross_attention=True, text_context_len=text_len)
    attention.attention_fn = attention_fn
    x = torch.randn(videos * frames, queries, width)
    text = torch.randn(videos, text_len, 24)
    image = torch.randn(videos * frames if image_per_frame else videos, image_len, 24)
    per_frame_image = image if image_per_frame else image.repeat_interleave(frames, dim=0)
    copies = torch.cat([text.repeat_interleave(frames, dim=0), per_frame_image], dim=1)
    expected = attention(x, copies)
    got = attention(x, FrameContext(text, image))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(attention(x, FrameContext(text.flip(0), image)), expected)  # the text does count


def _assert_close_in_low_precision(ours: torch.Tensor, reference: torch.Tensor, rms_bound: float) -> None:
    """Loose bounds for reduced precision: RMS error relative to the reference, and the worst element."""
    error = ours.float() - reference
    assert torch.isfinite(ours).all()
    assert float(error.norm() / reference.norm()) < rms_bound
    assert float(error.abs().max()) < 2 * rms_bound * float(reference.abs().max())


@torch.no_grad()
def test_unet_reduced_precision_paths(unet: UNet3D, fixtures: FixtureSet) -> None:
    """bf16 autocast, bf16 weights and fp16 weights all run and stay close to fp32 (observed on tiny A:
    bf16 about 2.5e-2 RMS-relative, fp16 about 3.4e-3: the 3 mantissa bits between them)."""
    x, t, context, fs = _inputs(fixtures)
    reference = unet(x, t, context, fs)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_out = unet(x, t, context, fs)
    assert autocast_out.dtype == torch.float32
    _assert_close_in_low_precision(autocast_out, reference, rms_bound=5e-2)

    for dtype, rms_bound in ((torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
        model = copy.deepcopy(unet).to(dtype)
        out = model(x.to(dtype), t, context.to(dtype), fs)
        assert out.dtype == dtype
        _assert_close_in_low_precision(out, reference, rms_bound=rms_bound)


@torch.no_grad()
def test_unet_rejects_bad_input(unet: UNet3D, fixtures: FixtureSet) -> None:
    x, t, context, fs = _inputs(fixtures)
    with pytest.raises(ValueError, match="in_channels|x must be"):
        unet(x[:, :4], t, context, fs)
    with pytest.raises(ValueError, match="context"):
        unet(x, t, context[:1], fs)


def test_unet_512_key_set_matches_official() -> None:
    listing = json.loads(gzip.decompress(STATE_DICT_LISTING.read_bytes()))
    prefix = PREFIXES["unet"]
    expected = {e["key"][len(prefix) :]: tuple(e["shape"]) for e in listing["keys"] if e["key"].startswith(prefix)}
    with torch.device("meta"):
        model = UNet3D(builtin_config().unet)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
