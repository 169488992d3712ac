"""The pipeline on the fixture's tiny checkpoint: invariants the parity table does not show."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import resident
from tooncrafter.conditioning import ConditionEncoder
from tooncrafter.denoising import unet_velocities
from tooncrafter.generation import GenerationCancelled, GenerationRequest
from tooncrafter.media.tensors import preprocess_keyframe
from tooncrafter.pipeline import ToonCrafterPipeline


def _images(count: int, size: tuple[int, int] = (96, 160)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def _pixels(pipeline: ToonCrafterPipeline, count: int = 2) -> torch.Tensor:
    return torch.stack([preprocess_keyframe(image, *pipeline.pixel_size) for image in _images(count)])


def _encoder(pipeline: ToonCrafterPipeline) -> ConditionEncoder:
    return ConditionEncoder(pipeline.components, pipeline.placement)


def _request(count: int = 2, **options) -> GenerationRequest:
    defaults = dict(keyframes=_images(count), seed=7, prompt="a cat", steps=3, cfg_scale=7.5, eta=1.0, motion_steps=10)
    defaults.update(options)
    return GenerationRequest(**defaults)


def test_generate_makes_T_frames_at_the_model_size(pipeline: ToonCrafterPipeline) -> None:
    result = pipeline(_request())
    height, width = pipeline.pixel_size
    assert result.frames.shape == (pipeline.num_frames, height, width, 3)
    assert result.frames.dtype == np.uint8 and result.seed == 7


def test_same_seed_same_frames_other_seed_differs(pipeline: ToonCrafterPipeline) -> None:
    a = pipeline(_request(seed=11)).frames
    b = pipeline(_request(seed=11)).frames
    c = pipeline(_request(seed=12)).frames
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("count", [3, 4])
def test_more_keyframes_still_give_T_frames(pipeline: ToonCrafterPipeline, count: int) -> None:
    frames = pipeline(_request(count)).frames
    assert frames.shape[0] == pipeline.num_frames


def test_keyframe_lengths_and_keep_all_frames(pipeline: ToonCrafterPipeline) -> None:
    t = pipeline.num_frames
    lengths = [1, 1, t - 2]  # moves the middle keyframe towards the start
    placed = pipeline(_request(3, keyframe_lengths=lengths)).frames
    even = pipeline(_request(3)).frames
    assert placed.shape[0] == t and not np.array_equal(placed, even)
    everything = pipeline(_request(3, keep_all_frames=True)).frames
    assert everything.shape[0] == 2 * (t - 1) + 1


def test_bad_keyframe_lengths_are_refused(pipeline: ToonCrafterPipeline) -> None:
    with pytest.raises(ValueError, match="sum"):
        pipeline(_request(3, keyframe_lengths=[1, 1, 1]))


def test_step_counts_that_gave_nan_officially_are_finite(pipeline: ToonCrafterPipeline) -> None:
    # video_to_frames refuses non-finite values, so a NaN latent would raise here
    result = pipeline(_request(steps=7, eta=1.0, seed=1))
    assert result.frames.shape[0] == pipeline.num_frames


def test_the_seed_is_required() -> None:
    with pytest.raises(TypeError, match="seed"):
        GenerationRequest(keyframes=_images(2))  # type: ignore[call-arg]


def test_cancel_raised_in_the_progress_callback_stops_between_steps(pipeline: ToonCrafterPipeline) -> None:
    seen: list[int] = []

    def on_step(step: int, total: int) -> None:
        seen.append(step)
        if step == 2:
            raise GenerationCancelled

    with pytest.raises(GenerationCancelled):
        pipeline(_request(steps=5), on_step=on_step)
    assert seen == [1, 2]


def test_progress_reports_every_step(pipeline: ToonCrafterPipeline) -> None:
    seen: list[tuple[int, int]] = []
    pipeline(_request(steps=4), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_distinct_keyframe_encoding_equals_the_repeated_video(pipeline: ToonCrafterPipeline) -> None:
    """The official code encodes T frames (key 1 repeated, then key 2); the encoder is per frame, so encoding
    the two distinct keyframes gives the same posterior for every frame."""
    pixels = _pixels(pipeline)
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
    cond = _encoder(pipeline)(
        _pixels(pipeline), [(0, 1)], prompt="a cat", cfg_scale=7.5, motion_steps=10,
        posterior_noise=torch.randn(2, pipeline.config.diffusion.channels, *pipeline.config.latent_size),
    )
    x = torch.randn(1, pipeline.config.diffusion.channels, pipeline.num_frames, *pipeline.config.latent_size)
    v_cond, v_uncond = unet_velocities(pipeline.components.unet, cond, torch.float32)(x, 500)
    unet = pipeline.components.unet
    t = torch.tensor([500])
    with torch.no_grad():
        v_c = unet(torch.cat([x, cond.c_concat], 1), t, cond.context_cond, cond.fs)
        v_u = unet(torch.cat([x, cond.c_concat], 1), t, cond.context_uncond, cond.fs)
    torch.testing.assert_close(v_cond, v_c, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v_uncond, v_u, atol=1e-4, rtol=1e-4)


def test_text_embedding_of_a_prompt_is_computed_once(pipeline: ToonCrafterPipeline, monkeypatch) -> None:
    conditioning = _encoder(pipeline)
    encoder = pipeline.components.text_encoder
    calls = []
    original = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda tokens: calls.append(tokens.shape[0]) or original(tokens))
    first = conditioning.text_embeddings(["a unique prompt for the cache test"])
    assert calls == [1]  # a new prompt is encoded
    again = conditioning.text_embeddings(["a unique prompt for the cache test", ""])
    assert calls[1:] in ([], [1])  # at most "" (cached earlier or not), never the prompt again
    torch.testing.assert_close(again[0], first[0])


@pytest.mark.skipif(not resident.AVAILABLE, reason="/proc/self/pagemap is Linux")
def test_a_request_gives_back_the_mapped_pages_it_no_longer_reads(pipeline: ToonCrafterPipeline, monkeypatch) -> None:
    """On CPU, CLIP, the Resampler and the VAE encoder leave memory once the conditioning is made, the UNet once
    sampling is done; the VAE decoder stays; the next request faults them back in and makes the same frames.

    Residency is read right after each release: later, a kernel with large page-cache folios (ext4 on Linux
    6.18 here) maps a whole folio back at a fault on a neighbouring tensor's page (the decoder's, say), so the
    end of the request cannot tell what the release did."""
    import tooncrafter.pipeline as pipeline_module

    c = pipeline.components
    released = [c.text_encoder, c.image_encoder, c.resampler, c.vae.encoder, c.unet]
    right_after: dict[str, tuple[int, int]] = {}
    release = pipeline_module.release_module_pages

    def observed_release(*modules):
        freed = release(*modules)
        right_after.update({type(m).__name__: resident.module_pages(m) for m in modules})
        return freed

    monkeypatch.setattr(pipeline_module, "release_module_pages", observed_release)
    first = pipeline(_request(steps=2)).frames
    pages = {type(m).__name__: right_after[type(m).__name__] for m in released}
    assert all(total > 0 for total, _ in pages.values()), pages  # weights that span whole pages: not vacuous
    assert all(present == 0 for _, present in pages.values()), pages
    assert resident.module_pages(c.vae.decoder)[1] > 0  # read by the decode: still there
    again = pipeline(_request(steps=2)).frames
    np.testing.assert_array_equal(first, again)


def test_a_cpu_load_runs_every_attention_on_the_cpu_form_and_packs_the_linears(fixture_set) -> None:
    from tooncrafter.model.attention import cpu_attention
    from tooncrafter.model.cpu_prepack import PrepackedGEGLU, PrepackedLinear
    from tooncrafter.model.onednn import linear_prepack_available

    loaded = ToonCrafterPipeline.from_pretrained(fixture_set.directory, device="cpu", dtype="float32", progress=False)
    parts = loaded.components
    layers = [m for part in (parts.unet, parts.vae, parts.resampler) for m in part.modules() if hasattr(m, "attention_fn")]
    assert layers and all(m.attention_fn is cpu_attention for m in layers)
    if linear_prepack_available(torch.float32):
        kinds = {type(m) for m in parts.unet.modules()}
        assert PrepackedLinear in kinds and PrepackedGEGLU in kinds and torch.nn.Linear not in kinds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cpu_load_packs_the_unet_for_guided_steps_and_reads_mapped_weights_in_place_on_tiny_maps(fixture_set, dtype) -> None:
    """Every packed convolution is packed at load for the input a guided step gives it (the request packs
    nothing); on tiny maps a memory-mapped weight (fp32 from the checkpoint) is read in place, a converted one
    (bf16) packed as one GEMM's matrix."""
    from tooncrafter.model.cpu_prepack import PrepackedConv
    from tooncrafter.model.gemm_conv import GemmConv
    from tooncrafter.model.mapped_pages import MappedPages
    from tooncrafter.model.onednn import linear_prepack_available

    if not linear_prepack_available(dtype):
        pytest.skip("oneDNN runs no products of this dtype on this CPU")
    loaded = ToonCrafterPipeline.from_pretrained(fixture_set.directory, device="cpu", dtype=dtype, progress=False)
    unet = loaded.components.unet
    packed_at_load = {name: m._packed_for for name, m in unet.named_modules() if isinstance(m, PrepackedConv)}
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.setdefault(name, tuple(args[0].shape))

    hooks = [
        m.register_forward_pre_hook(functools.partial(record, name)) for name, m in unet.named_modules() if isinstance(m, PrepackedConv)
    ]
    loaded(_request(steps=1))
    for hook in hooks:
        hook.remove()
    assert seen and all(packed_at_load[name] == shape for name, shape in seen.items())
    in_place = [m for m in unet.modules() if isinstance(m, GemmConv)]
    as_gemm = [m for m in unet.modules() if isinstance(m, PrepackedConv) and m._packed_as_gemm]
    mapped = MappedPages()
    if dtype == torch.float32:
        tiny = [m for m in in_place if m.fallback.dense_weight is not None]  # the others packed for large maps
        assert tiny and not as_gemm
        assert all(mapped.holds(m.fallback.dense_weight) for m in tiny)  # still the checkpoint's pages
    else:
        assert as_gemm and not in_place
