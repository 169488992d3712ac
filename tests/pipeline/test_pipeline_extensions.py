"""The extension inputs on the tiny checkpoints: sketch guidance, seamless loops, frame multipliers.

The reference for "defaults change nothing" is today's pipeline composed from its public pieces in the test
itself (`plain_frames`, the algorithm `ToonCrafterPipeline.__call__` ran before these inputs existed), never a
stored value. Sizes and frame counts come from the fixture's model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.sketch import write_tiny_sketch_checkpoint
from PIL import Image, ImageDraw

from tooncrafter.conditioning import ConditionEncoder
from tooncrafter.decoding import decode_latents
from tooncrafter.denoising import SketchGuidance, guided_denoiser, unet_velocities
from tooncrafter.generation import (
    GenerationCancelled,
    GenerationRequest,
    Sketch,
    SketchGuidanceUnavailable,
)
from tooncrafter.keyframes import frame_picks, plan_clip
from tooncrafter.media.tensors import preprocess_keyframe, video_to_frames
from tooncrafter.model.checkpoint import read_state_dict
from tooncrafter.model.loader import load_components
from tooncrafter.model.sketch_encoder import encode_sketches
from tooncrafter.pipeline import ToonCrafterPipeline
from tooncrafter.sampling import (
    ddim_schedule,
    generator_noise,
    randn_tensor,
    sample_ddim,
)


@pytest.fixture(scope="module")
def components(fixture_set):
    loaded = load_components(fixture_set.config, read_state_dict(fixture_set.checkpoint_path))
    if not loaded.has_clip:
        pytest.skip("the fixture checkpoint has no CLIP towers: the pipeline needs them")
    return loaded


@pytest.fixture(scope="module")
def sketch_checkpoint(fixture_set, tmp_path_factory) -> Path:
    return write_tiny_sketch_checkpoint(tmp_path_factory.mktemp("sketch") / "sketch_encoder.ckpt", fixture_set.config.unet)


@pytest.fixture(scope="module")
def pipeline(components, sketch_checkpoint) -> ToonCrafterPipeline:
    return ToonCrafterPipeline(components, sketch_checkpoint=sketch_checkpoint)


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (96, 160, 3), dtype=np.uint8)) for _ in range(count)]


def _drawing(seed: int) -> Image.Image:
    """Dark strokes on white paper, like a user's line art."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (160, 96), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, x1 = (int(v) for v in rng.integers(0, 160, 2))
        y0, y1 = (int(v) for v in rng.integers(0, 96, 2))
        draw.line([(x0, y0), (x1, y1)], fill="black", width=3)
    return image


def _request(count: int = 2, **options) -> GenerationRequest:
    values = {"keyframes": _images(count), "seed": 5, "prompt": "a cat", "steps": 2, "cfg_scale": 7.5, "eta": 1.0, "motion_steps": 10}
    values.update(options)
    return GenerationRequest(**values)


@torch.no_grad()
def plain_frames(pipeline: ToonCrafterPipeline, request: GenerationRequest) -> np.ndarray:
    """Today's algorithm (before loop, multipliers and sketches), composed from the public pieces."""
    count, num_frames = len(request.keyframes), pipeline.num_frames
    channels, (h, w) = pipeline.config.diffusion.channels, pipeline.config.latent_size
    windows = [(i, i + 1) for i in range(count - 1)]
    pixels = torch.stack([preprocess_keyframe(image, *pipeline.pixel_size) for image in request.keyframes])
    generator = torch.Generator("cpu").manual_seed(request.seed)
    drawn = randn_tensor((len(windows) * num_frames, channels, h, w), generator, "cpu", torch.float32)
    posterior_noise = drawn[[i * num_frames for i in range(len(windows))] + [len(windows) * num_frames - 1]]
    x_T = randn_tensor((len(windows), channels, num_frames, h, w), generator, "cpu", torch.float32)
    cond = ConditionEncoder(pipeline.components, pipeline.placement)(
        pixels, windows, prompt=request.prompt, cfg_scale=request.cfg_scale, motion_steps=request.motion_steps,
        posterior_noise=posterior_noise,
    )
    denoise = guided_denoiser(pipeline.components.unet, cond, request.cfg_scale, torch.float32)
    plan = ddim_schedule(pipeline.schedule, request.steps, request.eta)
    latents = sample_ddim(denoise, x_T, plan, generator_noise(generator, "cpu", torch.float32))
    videos = decode_latents(
        pipeline.components.vae, latents, cond.ref_context,
        scale_factor=pipeline.config.diffusion.scale_factor, placement=pipeline.placement,
    )
    window_frames = [video_to_frames(video) for video in videos]
    picks = frame_picks(count, num_frames, request.keyframe_lengths, keep_all=request.keep_all_frames)
    return np.stack([window_frames[window][index] for window, index in picks])


class _Spy:
    """Wraps a callable and records the arguments and the result of each call."""

    def __init__(self, inner):
        self.inner, self.calls, self.results = inner, [], []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        self.results.append(self.inner(*args, **kwargs))
        return self.results[-1]


# --------------------------------------------------------------------------------------------
# Defaults: today's output, bit for bit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "count, options",
    [(2, {}), (3, {"keyframe_lengths": "uneven"}), (3, {"keep_all_frames": True})],
)
def test_defaults_and_unused_sketches_are_bit_identical_to_today(pipeline, count, options):
    if options.get("keyframe_lengths") == "uneven":
        options = {"keyframe_lengths": [1, 1, pipeline.num_frames - 2]}
    expected = plain_frames(pipeline, _request(count, **options))
    assert np.array_equal(pipeline(_request(count, **options)).frames, expected)
    # an all-black sketch on every frame at scale 0 changes nothing (and the encoder is not needed for it)
    black = Image.new("L", (160, 96), 0)
    frames = plan_clip(count, pipeline.num_frames, options.get("keyframe_lengths"), keep_all=bool(options.get("keep_all_frames"))).num_output_frames
    sketches = tuple(Sketch(frame, black) for frame in range(frames))
    idle = ToonCrafterPipeline(pipeline.components, sketch_checkpoint="/nonexistent/sketch_encoder.ckpt")
    assert np.array_equal(idle(_request(count, sketches=sketches, sketch_scale=0.0, **options)).frames, expected)
    assert not idle.sketch_encoder.loaded


# --------------------------------------------------------------------------------------------
# Sketch guidance
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_the_denoiser_adds_the_residuals_of_the_cond_and_uncond_rows(pipeline):
    """One batched call equals the UNet called on each row set with `encode_sketches` of that row set."""
    cfg = pipeline.config
    pixels = torch.stack([preprocess_keyframe(image, *pipeline.pixel_size) for image in _images(2)])
    cond = ConditionEncoder(pipeline.components, pipeline.placement)(
        pixels, [(0, 1)], prompt="a cat", cfg_scale=7.5, motion_steps=10,
        posterior_noise=torch.randn(2, cfg.diffusion.channels, *cfg.latent_size),
    )
    x = torch.randn(1, cfg.diffusion.channels, cfg.num_frames, *cfg.latent_size)
    sketches = torch.zeros(1, cfg.num_frames, 1, *pipeline.pixel_size)
    sketches[0, 1] = torch.rand(1, *pipeline.pixel_size).round()
    mask = torch.zeros(1, cfg.num_frames, dtype=torch.bool)
    mask[0, 1] = True
    encoder = pipeline.sketch_encoder.get()
    v_cond, v_uncond = unet_velocities(pipeline.components.unet, cond, torch.float32, SketchGuidance(encoder, sketches, mask, 0.6))(x, 400)
    t = torch.tensor([400])
    unet_in = torch.cat([x, cond.c_concat], 1)
    for context, v in ((cond.context_cond, v_cond), (cond.context_uncond, v_uncond)):
        residuals = encode_sketches(encoder, x, t, context, sketches, mask, 0.6)
        expected = pipeline.components.unet(unet_in, t, context, cond.fs, sketch_residuals=residuals)
        torch.testing.assert_close(v, expected, atol=1e-4, rtol=1e-4)
    plain = unet_velocities(pipeline.components.unet, cond, torch.float32)(x, 400)[0]
    assert float((v_cond - plain).abs().max()) > 1e-3


@torch.no_grad()
def test_a_cpu_sketch_encoder_runs_the_cpu_fast_paths_and_gives_the_plain_encoders_residuals(pipeline, sketch_checkpoint):
    """Loaded for a CPU pipeline, the encoder that runs beside the UNet every step gets its packed layers and
    attention; its residuals are those of the encoder as loaded."""
    from tooncrafter.model.attention import cpu_attention
    from tooncrafter.model.onednn import linear_prepack_available
    from tooncrafter.model.sketch_encoder import SketchEncoderConfig, load_sketch_encoder

    cfg = pipeline.config
    encoder = pipeline.sketch_encoder.get()
    layers = [m for m in encoder.modules() if hasattr(m, "attention_fn")]
    assert layers and all(m.attention_fn is cpu_attention for m in layers)
    if linear_prepack_available(torch.float32):
        kinds = {type(m) for m in encoder.modules()}
        assert torch.nn.Linear not in kinds and torch.nn.Conv2d not in kinds, kinds
    plain = load_sketch_encoder(sketch_checkpoint, SketchEncoderConfig.from_unet(cfg.unet))
    pixels = torch.stack([preprocess_keyframe(image, *pipeline.pixel_size) for image in _images(2)])
    cond = ConditionEncoder(pipeline.components, pipeline.placement)(
        pixels, [(0, 1)], prompt="a cat", cfg_scale=7.5, motion_steps=10,
        posterior_noise=torch.randn(2, cfg.diffusion.channels, *cfg.latent_size),
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.diffusion.channels, cfg.num_frames, *cfg.latent_size, generator=generator)
    sketches = torch.rand(1, cfg.num_frames, 1, *pipeline.pixel_size, generator=generator).round()
    mask = torch.ones(1, cfg.num_frames, dtype=torch.bool)
    t = torch.tensor([400])
    got = encode_sketches(encoder, x, t, cond.context_cond, sketches, mask, 0.6)
    expected = encode_sketches(plain, x, t, cond.context_cond, sketches, mask, 0.6)
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        # fp32 in another summation order: over 60 seeds on an Ice Lake Xeon the worst element sat
        # 2.3e-4 x max|b| beyond rtol (near-zero outputs after cancellation); a wrong residual is off by O(max).
        torch.testing.assert_close(a, b, atol=1e-3 * float(b.abs().max()), rtol=1e-4)


def test_sketches_guide_the_clip_only_through_their_frames(pipeline, monkeypatch):
    num_frames = pipeline.num_frames
    frames = (1, num_frames - 2)
    sketches = tuple(Sketch(frame, _drawing(frame)) for frame in frames)
    plain = pipeline(_request()).frames
    encoder = pipeline.sketch_encoder.get()
    spy = _Spy(encoder.forward)
    monkeypatch.setattr(encoder, "forward", spy)
    guided = pipeline(_request(sketches=sketches, sketch_scale=0.6)).frames
    again = pipeline(_request(sketches=sketches, sketch_scale=0.6)).frames
    assert guided.shape == plain.shape and np.array_equal(guided, again)
    assert not np.array_equal(guided, plain)
    # every step: the sketched frames only, for the cond and the uncond rows (cfg_scale > 1)
    assert len(spy.calls) == 2 * 2
    assert all(args[0].shape[0] == 2 * len(frames) for args, _ in spy.calls)
    stronger = pipeline(_request(sketches=sketches, sketch_scale=2.0)).frames
    assert not np.array_equal(stronger, guided)


def test_a_sketch_guides_only_its_own_inbetween_window(pipeline):
    """With frame_multiplier 2 an odd output frame comes from one in-between window: a sketch there changes
    that window's frames and nothing else (the first pass and the other windows stay bit-identical)."""
    options = {"frame_multiplier": 2, "steps": 1}
    plain = pipeline(_request(**options)).frames
    target = 3  # in-between window 1
    guided = pipeline(_request(sketches=(Sketch(target, _drawing(9)),), **options)).frames
    changed = [i for i in range(len(plain)) if not np.array_equal(plain[i], guided[i])]
    assert changed == [target]


def test_lines_extracted_from_a_picture_guide_too(pipeline):
    picture = _images(1)[0]
    guided = pipeline(_request(sketches=(Sketch(2, picture, extract_lines=True),))).frames
    assert not np.array_equal(guided, pipeline(_request()).frames)


def test_the_sketch_encoder_loads_only_when_needed_and_names_the_fix(components, tmp_path):
    missing = ToonCrafterPipeline(components, sketch_checkpoint=tmp_path / "nowhere.ckpt")
    missing(_request(steps=1))
    assert not missing.sketch_encoder.loaded
    with pytest.raises(SketchGuidanceUnavailable, match="--sketch-checkpoint"):
        missing(_request(steps=1, sketches=(Sketch(1, _drawing(1)),)))
    with pytest.raises(ValueError, match="frames"):
        missing(_request(steps=1, sketches=(Sketch(10_000, _drawing(1)),)))


# --------------------------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
def test_a_loop_samples_the_wrap_around_pair_and_ends_in_it(pipeline, monkeypatch, count):
    sample = _Spy(pipeline._sample_windows)
    monkeypatch.setattr(pipeline, "_sample_windows", sample)
    frames = pipeline(_request(count, loop=True)).frames
    (args, _), = sample.calls
    windows = args[1]
    assert list(windows) == [(i, i + 1) for i in range(count - 1)] + [(count - 1, 0)]
    assert frames.shape[0] == pipeline.num_frames  # the first frame is not repeated at the end
    (window_frames,) = sample.results
    last = plan_clip(count, pipeline.num_frames, loop=True).picks[-1]
    assert last.window == count - 1 and last.frame < pipeline.num_frames - 1
    assert np.array_equal(frames[-1], window_frames[last.window][last.frame])  # the clip ends inside last -> first
    assert np.array_equal(frames[0], window_frames[0][0])


# --------------------------------------------------------------------------------------------
# Frame multipliers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("loop", [False, True])
def test_frame_counts_and_exact_first_pass_frames(pipeline, count, loop):
    options = {"steps": 1, "cfg_scale": 1.0, "loop": loop}
    base = pipeline(_request(count, **options)).frames
    assert len(base) == pipeline.num_frames
    for multiplier in (2, 4):
        frames = pipeline(_request(count, frame_multiplier=multiplier, **options)).frames
        expected = len(base) * multiplier if loop else (len(base) - 1) * multiplier + 1
        assert frames.shape == (expected, *base.shape[1:]), multiplier
        assert np.array_equal(frames[::multiplier], base)  # the first pass (keyframes included) is untouched
        assert len({frames[i].tobytes() for i in range(len(frames))}) > len(base)  # real in-betweens, not copies


def test_progress_counts_every_pass_and_a_cancel_stops_the_second(pipeline):
    steps = 2
    windows = pipeline.num_frames - 1  # in-between windows of a non-loop clip
    batches = -(-windows // pipeline.inbetween_batch)
    seen: list[tuple[int, int]] = []
    pipeline(_request(steps=steps, frame_multiplier=2), on_step=lambda i, n: seen.append((i, n)))
    total = steps * (1 + batches)
    assert seen == [(i, total) for i in range(1, total + 1)]

    stopped: list[int] = []

    def on_step(step: int, total: int) -> None:
        stopped.append(step)
        if step == steps + 1:  # the first step of the in-between pass
            raise GenerationCancelled

    with pytest.raises(GenerationCancelled):
        pipeline(_request(steps=steps, frame_multiplier=2), on_step=on_step)
    assert stopped == list(range(1, steps + 2))


def test_inbetween_frames_do_not_depend_on_the_batching(pipeline):
    one_by_one = ToonCrafterPipeline(pipeline.components, inbetween_batch=1)
    options = {"steps": 1, "frame_multiplier": 2, "loop": True}
    a = pipeline(_request(**options)).frames
    b = one_by_one(_request(**options)).frames
    assert int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1
