"""Sketch encoder: parity with two public re-implementations, strict loading, and the UNet hook.

Fixtures (tests/fixtures/sketch_tiny, made by tools/make_sketch_fixtures.py) hold inputs, the
references' per-block residuals and their UNet outputs with residuals; the random weights are
rebuilt here from (seed, key, shape) and checked against the recorded digest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tooncrafter.fixtures import (
    DEFAULT_FIXTURES,
    FixtureSet,
    compare,
    random_state_dict,
    state_dict_digest,
)
from tooncrafter.model.checkpoint import (
    CheckpointError,
    component_state_dict,
    load_into,
    read_state_dict,
)
from tooncrafter.model.config import builtin_config
from tooncrafter.model.sketch_encoder import (
    SketchEncoder,
    SketchEncoderConfig,
    build_sketch_encoder_on_meta,
    encode_sketches,
    load_sketch_encoder,
)
from tooncrafter.model.unet import UNet3D

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sketch_tiny"
VARIANTS = ("text", "all")


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((FIXTURES / "fixtures_meta.json").read_text())


@pytest.fixture(scope="module")
def fx() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "fixtures.safetensors"))


@pytest.fixture(scope="module")
def reference(meta: dict) -> FixtureSet:
    """The tiny reference set whose UNet weights and config the sketch fixtures were made with."""
    directory = DEFAULT_FIXTURES.parent / meta["unet_checkpoint"]["reference_set"]
    if not (directory / "config.yaml").is_file():
        pytest.skip(f"no reference set at {directory}")
    fixture_set = FixtureSet.load(directory)
    digest = hashlib.sha256(fixture_set.checkpoint_path.read_bytes()).hexdigest()
    assert digest == meta["unet_checkpoint"]["sha256"], "the sketch fixtures were made with another UNet checkpoint"
    return fixture_set


@pytest.fixture(scope="module")
def unet(reference: FixtureSet) -> UNet3D:
    with torch.device("meta"):
        model = UNet3D(reference.config.unet, image_tokens_per_frame=reference.config.resampler.num_queries)
    return load_into(model, component_state_dict(read_state_dict(reference.checkpoint_path), "unet"), "unet")


def _config(reference: FixtureSet, variant: str = "text") -> SketchEncoderConfig:
    return SketchEncoderConfig.from_unet(reference.config.unet, context_tokens=variant)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def weights(reference: FixtureSet, meta: dict) -> dict[str, torch.Tensor]:
    shapes = {k: tuple(v.shape) for k, v in build_sketch_encoder_on_meta(_config(reference)).state_dict().items()}
    state = random_state_dict(shapes, meta["seed"], damped=meta["damped"])
    assert state_dict_digest(state) == meta["weights_digest"], "our key layout or the weight generator changed"
    return state


@pytest.fixture(scope="module")
def checkpoint_file(weights: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sketch") / "sketch_encoder.ckpt"
    torch.save(weights, path)  # flat dict, as both references read it
    return path


def _sketch_inputs(fx: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sketches `[T, 1, H, W]` (black where a frame has none) and the frame mask `[T]`."""
    frames = fx["sketch_frames"]
    num_frames = fx["x_noisy"].shape[2]
    sketches = torch.zeros(num_frames, *fx["sketch_uint8"].shape[1:])
    sketches[frames] = fx["sketch_uint8"].float() / 255.0
    mask = torch.zeros(num_frames, dtype=torch.bool)
    mask[frames] = True
    return sketches, mask


def _unet_input(fx: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([fx["x_noisy"], fx["c_concat"]], dim=1)


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_residuals_match_reference(variant: str, reference: FixtureSet, checkpoint_file: Path, fx: dict) -> None:
    encoder = load_sketch_encoder(checkpoint_file, _config(reference, variant))
    sketches, mask = _sketch_inputs(fx)
    residuals = encode_sketches(encoder, fx["x_noisy"], fx["timesteps"], fx["context"], sketches, mask, scale=1.0)
    assert residuals is not None and len(residuals) == encoder.num_residuals
    b, _, t = fx["x_noisy"].shape[:3]
    frames = fx["sketch_frames"]
    for index, residual in enumerate(residuals):
        per_frame = residual.reshape(b, t, *residual.shape[1:])
        ours = per_frame[:, frames].reshape(-1, *residual.shape[1:])
        result = compare(f"residual_{variant}_{index:02d}", ours, fx[f"residual_{variant}_{index:02d}"])
        assert result.passed, result
        unsketched = torch.ones(t, dtype=torch.bool)
        unsketched[frames] = False
        assert torch.count_nonzero(per_frame[:, unsketched]) == 0, "frames without a sketch must get no guidance"


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_unet_with_residuals_matches_reference(variant: str, reference: FixtureSet, unet: UNet3D, checkpoint_file: Path, fx: dict) -> None:
    encoder = load_sketch_encoder(checkpoint_file, _config(reference, variant))
    sketches, mask = _sketch_inputs(fx)
    scale = float(fx["sketch_scale"])
    residuals = encode_sketches(encoder, fx["x_noisy"], fx["timesteps"], fx["context"], sketches, mask, scale)
    out = unet(_unet_input(fx), fx["timesteps"], fx["context"], fx["fs"], sketch_residuals=residuals)
    result = compare(f"unet_out_{variant}", out, fx[f"unet_out_{variant}"])
    assert result.passed, result
    # the guidance really moves the output (not a vacuous comparison)
    plain = unet(_unet_input(fx), fx["timesteps"], fx["context"], fx["fs"])
    assert float((out - plain).abs().max()) > 100 * result.tolerance


def test_the_two_references_differ_only_in_the_context(fx: dict) -> None:
    """Why `context_tokens` exists: same weights and inputs, different residuals after the first attention."""
    assert torch.equal(fx["residual_text_00"], fx["residual_all_00"])  # before any attention
    last = max(int(k.rsplit("_", 1)[1]) for k in fx if k.startswith("residual_text_"))
    assert float((fx[f"residual_text_{last:02d}"] - fx[f"residual_all_{last:02d}"]).abs().max()) > 1e-2


# --------------------------------------------------------------------------------------------
# No sketch, no change
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_black_sketch_at_scale_zero_changes_nothing(reference: FixtureSet, unet: UNet3D, checkpoint_file: Path, fx: dict) -> None:
    encoder = load_sketch_encoder(checkpoint_file, _config(reference))
    t = fx["x_noisy"].shape[2]
    black = torch.zeros(t, *fx["sketch_uint8"].shape[1:])
    everywhere = torch.ones(t, dtype=torch.bool)
    residuals = encode_sketches(encoder, fx["x_noisy"], fx["timesteps"], fx["context"], black, everywhere, scale=0.0)
    x, ts, ctx, fs = _unet_input(fx), fx["timesteps"], fx["context"], fx["fs"]
    assert torch.equal(unet(x, ts, ctx, fs, sketch_residuals=residuals), unet(x, ts, ctx, fs))
    # and at a non-zero scale, a black sketch still guides (the encoder also sees the noisy latent)
    guided = encode_sketches(encoder, fx["x_noisy"], fx["timesteps"], fx["context"], black, everywhere, scale=0.6)
    assert guided is not None and any(torch.count_nonzero(r) for r in guided)


@torch.no_grad()
def test_no_sketched_frame_gives_no_residuals(reference: FixtureSet, checkpoint_file: Path, fx: dict) -> None:
    encoder = load_sketch_encoder(checkpoint_file, _config(reference))
    sketches, _ = _sketch_inputs(fx)
    nowhere = torch.zeros(sketches.shape[0], dtype=torch.bool)
    assert encode_sketches(encoder, fx["x_noisy"], fx["timesteps"], fx["context"], sketches, nowhere, 1.0) is None


@torch.no_grad()
def test_unet_default_and_zero_residuals_are_bit_identical(reference: FixtureSet, unet: UNet3D, fx: dict) -> None:
    x, ts, ctx, fs = _unet_input(fx), fx["timesteps"], fx["context"], fx["fs"]
    shapes = [r.shape for r in (fx[k] for k in sorted(k for k in fx if k.startswith("residual_text_")))]
    b, t = x.shape[0], x.shape[2]
    zeros = [torch.zeros(b * t, *shape[1:]) for shape in shapes]
    assert torch.equal(unet(x, ts, ctx, fs, sketch_residuals=zeros), unet(x, ts, ctx, fs, sketch_residuals=None))
    with pytest.raises(ValueError, match="sketch_residuals must hold"):
        unet(x, ts, ctx, fs, sketch_residuals=zeros[:-1])


@torch.no_grad()
def test_per_batch_sketches_and_masks(reference: FixtureSet, checkpoint_file: Path, fx: dict) -> None:
    """A [B, T] mask and [B, T, 1, H, W] sketches: each batch row guided only where its own mask says."""
    encoder = load_sketch_encoder(checkpoint_file, _config(reference))
    sketches, mask = _sketch_inputs(fx)
    b, t = fx["x_noisy"].shape[0], fx["x_noisy"].shape[2]
    per_batch_mask = mask.expand(b, t).clone()
    per_batch_mask[1] = False
    shared = encode_sketches(encoder, fx["x_noisy"], fx["timesteps"], fx["context"], sketches, mask, 1.0)
    split = encode_sketches(encoder, fx["x_noisy"], fx["timesteps"], fx["context"], sketches.expand(b, *sketches.shape), per_batch_mask, 1.0)
    assert shared is not None and split is not None
    for full, partial in zip(shared, split):
        full, partial = full.unflatten(0, (b, t)), partial.unflatten(0, (b, t))
        torch.testing.assert_close(partial[0], full[0], rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(partial[1]) == 0


def test_bad_sketch_shapes_are_named(reference: FixtureSet, weights: dict, fx: dict) -> None:
    encoder = load_into(build_sketch_encoder_on_meta(_config(reference)), weights, "sketch_encoder")
    sketches, mask = _sketch_inputs(fx)
    with pytest.raises(ValueError, match="frame_mask"):
        encode_sketches(encoder, fx["x_noisy"], fx["timesteps"], fx["context"], sketches, mask[:-1], 1.0)
    with pytest.raises(ValueError, match="8x the latent size"):
        encode_sketches(encoder, fx["x_noisy"], fx["timesteps"], fx["context"], sketches[..., :-8], mask, 1.0)


# --------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------


def test_loads_ckpt_wrapped_and_safetensors_alike(reference: FixtureSet, weights: dict, tmp_path: Path) -> None:
    wrapped, safetensors = tmp_path / "wrapped.ckpt", tmp_path / "sketch_encoder.safetensors"
    torch.save({"state_dict": weights}, wrapped)
    save_file({k: v.half() for k, v in weights.items()}, str(safetensors))  # like kijai's fp16 file
    config = _config(reference)
    a = load_sketch_encoder(wrapped, config).state_dict()
    c = load_sketch_encoder(safetensors, config, dtype=torch.float16).state_dict()
    assert all(torch.equal(a[k], weights[k]) for k in weights)
    assert all(c[k].dtype == torch.float16 and torch.equal(c[k], weights[k].half()) for k in weights)


def test_missing_unexpected_and_misshapen_keys_are_errors_naming_them(reference: FixtureSet, weights: dict, tmp_path: Path) -> None:
    config = _config(reference)
    missing = dict(weights)
    del missing["middle_block_out.0.bias"]
    torch.save(missing, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"missing keys: middle_block_out\.0\.bias"):
        load_sketch_encoder(tmp_path / "missing.ckpt", config)
    extra = dict(weights, **{"control_model.extra": torch.zeros(1)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys: control_model\.extra"):
        load_sketch_encoder(tmp_path / "extra.safetensors", config)
    wider = dict(weights, **{"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)})  # an RGB hint
    torch.save(wider, tmp_path / "rgb.ckpt")
    with pytest.raises(CheckpointError, match=r"input_hint_block\.0\.weight"):
        load_sketch_encoder(tmp_path / "rgb.ckpt", config)


def test_refuses_pickled_code(reference: FixtureSet, tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "cfg": SketchEncoderConfig}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_sketch_encoder(path, _config(reference))


# --------------------------------------------------------------------------------------------
# The full-size layout
# --------------------------------------------------------------------------------------------


def test_full_size_layout_is_the_cldm_v21_controlnet() -> None:
    """From the 512 UNet config: the widths both references hard-code for sketch_encoder.ckpt."""
    config = SketchEncoderConfig.from_unet(builtin_config().unet)
    assert (config.in_channels, config.model_channels, config.channel_mult, config.context_dim) == (4, 320, (1, 2, 4, 4), 1024)
    encoder: SketchEncoder = build_sketch_encoder_on_meta(config)
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert shapes["input_hint_block.0.weight"] == (16, 1, 3, 3)
    assert shapes["input_hint_block.14.weight"] == (320, 256, 3, 3)
    assert shapes["zero_convs.0.0.weight"] == (320, 320, 1, 1)
    assert shapes["zero_convs.11.0.weight"] == (1280, 1280, 1, 1)
    assert shapes["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert shapes["middle_block_out.0.weight"] == (1280, 1280, 1, 1)
    assert not any("to_k_ip" in k or "temopral_conv" in k or "fps_embedding" in k or "time_stack" in k for k in shapes)
    assert encoder.num_residuals == len(encoder.zero_convs) + 1 == 13


@torch.no_grad()
def test_low_precision_weights_follow_fp32(reference: FixtureSet, checkpoint_file: Path, fx: dict) -> None:
    """bf16 weights and inputs (the GPU path, run here on CPU): residuals near the fp32 ones."""
    config = _config(reference)
    sketches, mask = _sketch_inputs(fx)
    args = (fx["timesteps"], fx["context"], sketches, mask, 1.0)
    full = encode_sketches(load_sketch_encoder(checkpoint_file, config), fx["x_noisy"], *args)
    low_encoder = load_sketch_encoder(checkpoint_file, config, dtype=torch.bfloat16)
    low = encode_sketches(low_encoder, fx["x_noisy"].bfloat16(), fx["timesteps"], fx["context"].bfloat16(), *args[2:])
    assert full is not None and low is not None
    for a, b in zip(full, low):
        assert b.dtype == torch.bfloat16
        assert float((b.float() - a).abs().max()) <= 5e-2 * float(a.abs().max()) + 1e-2
