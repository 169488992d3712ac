"""The pipeline on the fixture's tiny checkpoint: invariants the parity table does not show."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tooncrafter.generation import GenerationCancelled, GenerationRequest
from tooncrafter.model.checkpoint import read_state_dict
from tooncrafter.model.loader import load_components
from tooncrafter.pipeline import ToonCrafterPipeline


@pytest.fixture(scope="module")
def pipeline(fixture_set) -> ToonCrafterPipeline:
    components = load_components(fixture_set.config, read_state_dict(fixture_set.checkpoint_path))
    if not components.has_clip:
        pytest.skip("the fixture checkpoint has no CLIP towers: generate() needs them")
    return ToonCrafterPipeline(components)


def _images(count: int, size: tuple[int, int] = (96, 160)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def _request(count: int = 2, **options) -> GenerationRequest:
    defaults = dict(keyframes=_images(count), seed=7, prompt="a cat", steps=3, cfg_scale=7.5, eta=1.0, motion_steps=10)
    defaults.update(options)
    return GenerationRequest(**defaults)


def test_generate_makes_T_frames_at_the_model_size(pipeline: ToonCrafterPipeline) -> None:
    result = pipeline.generate(_request())
    height, width = pipeline.pixel_size
    assert result.frames.shape == (pipeline.num_frames, height, width, 3)
    assert result.frames.dtype == np.uint8 and result.seed == 7


def test_same_seed_same_frames_other_seed_differs(pipeline: ToonCrafterPipeline) -> None:
    a = pipeline.generate(_request(seed=11)).frames
    b = pipeline.generate(_request(seed=11)).frames
    c = pipeline.generate(_request(seed=12)).frames
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("count", [3, 4])
def test_more_keyframes_still_give_T_frames(pipeline: ToonCrafterPipeline, count: int) -> None:
    frames = pipeline.generate(_request(count)).frames
    assert frames.shape[0] == pipeline.num_frames


def test_keyframe_lengths_and_keep_all_frames(pipeline: ToonCrafterPipeline) -> None:
    t = pipeline.num_frames
    lengths = [1, 1, t - 2]  # moves the middle keyframe towards the start
    placed = pipeline.generate(_request(3, keyframe_lengths=lengths)).frames
    even = pipeline.generate(_request(3)).frames
    assert placed.shape[0] == t and not np.array_equal(placed, even)
    everything = pipeline.generate(_request(3, keep_all_frames=True)).frames
    assert everything.shape[0] == 2 * (t - 1) + 1


def test_bad_keyframe_lengths_are_refused(pipeline: ToonCrafterPipeline) -> None:
    with pytest.raises(ValueError, match="sum"):
        pipeline.generate(_request(3, keyframe_lengths=[1, 1, 1]))


def test_step_counts_that_gave_nan_officially_are_finite(pipeline: ToonCrafterPipeline) -> None:
    pixels = pipeline.preprocess(_images(2))
    video = pipeline.interpolate(pixels, steps=7, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(video).all()


def test_cancel_stops_between_steps(pipeline: ToonCrafterPipeline) -> None:
    seen: list[int] = []
    with pytest.raises(GenerationCancelled):
        pipeline.generate(_request(steps=5), on_step=lambda i, n: seen.append(i), should_cancel=lambda: len(seen) >= 2)
    assert seen == [1, 2]


def test_progress_reports_every_step(pipeline: ToonCrafterPipeline) -> None:
    seen: list[tuple[int, int]] = []
    pipeline.generate(_request(steps=4), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_distinct_keyframe_encoding_equals_the_repeated_video(pipeline: ToonCrafterPipeline) -> None:
    """The official code encodes T frames (key 1 repeated, then key 2); the encoder is per frame, so encoding
    the two distinct keyframes gives the same posterior for every frame."""
    pixels = pipeline.preprocess(_images(2))
    t = pipeline.num_frames
    repeated = torch.cat([pixels[:1].expand(t // 2, -1, -1, -1), pixels[1:].expand(t - t // 2, -1, -1, -1)])
    vae = pipeline.components.vae
    with torch.no_grad():
        full = vae.encode(repeated)
        distinct = vae.encode(pixels)
    torch.testing.assert_close(full.moments[0], distinct.moments[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.moments[-1], distinct.moments[1], atol=1e-5, rtol=1e-5)
    for h_full, h_distinct in zip(full.hidden_states, distinct.hidden_states):
        torch.testing.assert_close(h_full[[0, -1]], h_distinct, atol=1e-5, rtol=1e-5)


def test_batched_cond_uncond_equals_two_single_passes(pipeline: ToonCrafterPipeline) -> None:
    pixels = pipeline.preprocess(_images(2))
    cond = pipeline.condition(
        pixels, [(0, 1)], prompt="a cat", cfg_scale=7.5, motion_steps=10,
        posterior_noise=torch.randn(2, pipeline.config.diffusion.channels, *pipeline.config.latent_size),
    )
    records = []
    denoise = pipeline.denoiser(cond, 7.5, record=records.append)
    x = torch.randn(1, pipeline.config.diffusion.channels, pipeline.num_frames, *pipeline.config.latent_size)
    denoise(x, 500)
    unet = pipeline.components.unet
    t = torch.tensor([500])
    with torch.no_grad():
        v_c = unet(torch.cat([x, cond.c_concat], 1), t, cond.context_cond, cond.fs)
        v_u = unet(torch.cat([x, cond.c_concat], 1), t, cond.context_uncond, cond.fs)
    torch.testing.assert_close(records[0].v_cond, v_c, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(records[0].v_uncond, v_u, atol=1e-4, rtol=1e-4)


def test_text_embedding_of_a_prompt_is_computed_once(pipeline: ToonCrafterPipeline, monkeypatch) -> None:
    encoder = pipeline.components.text_encoder
    calls = []
    original = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda tokens: calls.append(tokens.shape[0]) or original(tokens))
    first = pipeline.text_embeddings(["a unique prompt for the cache test"])
    assert calls == [1]  # a new prompt is encoded
    again = pipeline.text_embeddings(["a unique prompt for the cache test", ""])
    assert calls[1:] in ([], [1])  # at most "" (cached earlier or not), never the prompt again
    torch.testing.assert_close(again[0], first[0])
