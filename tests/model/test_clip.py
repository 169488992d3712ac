"""OpenCLIP text and image towers: tokenizer, preprocessing and token parity, key sets, OpenCLIP release mapping."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from tooncrafter.fixtures import (
    DEFAULT_FIXTURES,
    FixtureSet,
    compare,
    fixtures_dir_from_env,
)
from tooncrafter.model.checkpoint import (
    component_state_dict,
    has_component,
    load_into,
    read_state_dict,
)
from tooncrafter.model.clip import (
    ImageEncoder,
    TextEncoder,
    build_open_clip,
    open_clip_state_to_components,
)
from tooncrafter.model.config import builtin_config

REFERENCE = DEFAULT_FIXTURES.parent
STATE_DICT_LISTING = REFERENCE / "tooncrafter_512_state_dict.json.gz"
PREPROCESS_320X512 = REFERENCE / "clip_preprocess_320x512.safetensors"
FIXTURE_DIRS = [fixtures_dir_from_env()]
_ids = lambda d: Path(d).name  # noqa: E731


def _load_fixtures(directory: Path) -> FixtureSet:
    if not (Path(directory) / "fixtures.safetensors").is_file():
        pytest.skip(f"no fixture set at {directory}")
    return FixtureSet.load(directory)


def _require(fx: FixtureSet, *names: str) -> None:
    if not fx.has(*names):
        pytest.skip(f"{fx.directory} lacks {names}")


def _checkpoint_with_towers(fx: FixtureSet) -> dict[str, torch.Tensor]:
    state = read_state_dict(fx.checkpoint_path)
    for component in ("text_encoder", "image_encoder"):
        if not has_component(state, component):
            pytest.skip(f"{fx.checkpoint_path} has no CLIP towers ({component} missing): CLIP comes from the OpenCLIP release")
    return state


def _encoders(config_text, config_image, text_state, image_state) -> tuple[TextEncoder, ImageEncoder]:
    with torch.device("meta"):
        text, image = TextEncoder(config_text), ImageEncoder(config_image)
    return load_into(text, text_state, "text_encoder"), load_into(image, image_state, "image_encoder")


def _weightless(cls, config):
    """A tower on `meta` (tokenizer and preprocessing need no weights); skipped when the fixture names a
    custom OpenCLIP architecture without its json beside the config (then nothing defines the tower)."""
    try:
        with torch.device("meta"):
            return cls(config)
    except ValueError as exc:
        pytest.skip(f"no OpenCLIP config for {config.arch!r}: {exc}")


def _image_inputs(fx: FixtureSet) -> torch.Tensor:
    """The fixture's CLIP image inputs: [pipe_keyframe_1, pipe_keyframe_2, zeros]."""
    key1 = fx["pipe_keyframe_1"]
    return torch.cat([key1, fx["pipe_keyframe_2"], torch.zeros_like(key1)])


def _listing(prefix: str) -> dict[str, tuple[int, ...]]:
    listing = json.loads(gzip.decompress(STATE_DICT_LISTING.read_bytes()))
    return {e["key"][len(prefix):]: tuple(e["shape"]) for e in listing["keys"] if e["key"].startswith(prefix)}


# --- text tower ------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", FIXTURE_DIRS, ids=_ids)
def test_tokenize_matches_open_clip_ids(directory: Path) -> None:
    fx = _load_fixtures(directory)
    _require(fx, "clip_text_tokens")
    if "clip_text_prompts" not in fx.meta:
        pytest.skip("fixtures_meta.json has no clip_text_prompts")
    text = _weightless(TextEncoder, fx.config.text_encoder)
    tokens = text.tokenize(fx.meta["clip_text_prompts"])
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, fx["clip_text_tokens"])


@pytest.mark.parametrize("directory", FIXTURE_DIRS, ids=_ids)
@torch.no_grad()
def test_text_encoder_parity(directory: Path) -> None:
    fx = _load_fixtures(directory)
    _require(fx, "clip_text_tokens", "clip_text_out")
    state = _checkpoint_with_towers(fx)
    with torch.device("meta"):
        text = TextEncoder(fx.config.text_encoder)
    load_into(text, component_state_dict(state, "text_encoder"), "text_encoder")
    result = compare("clip_text_out", text(fx["clip_text_tokens"]), fx["clip_text_out"])
    assert result.passed, result
    if fx.has("pipe_text_emb_cond", "pipe_text_emb_uncond") and "pipeline_prompt" in fx.meta:
        for name, prompt in (("pipe_text_emb_cond", fx.meta["pipeline_prompt"]), ("pipe_text_emb_uncond", "")):
            result = compare(name, text.encode([prompt]), fx[name])
            assert result.passed, result


# --- image tower -----------------------------------------------------------------------------


@pytest.mark.parametrize("directory", FIXTURE_DIRS, ids=_ids)
def test_image_preprocess_fixture(directory: Path) -> None:
    fx = _load_fixtures(directory)
    _require(fx, "pipe_keyframe_1", "clip_image_preprocessed_0")
    image = _weightless(ImageEncoder, fx.config.image_encoder)
    result = compare("clip_image_preprocessed_0", image.preprocess(fx["pipe_keyframe_1"]), fx["clip_image_preprocessed_0"])
    assert result.passed, result


def test_image_preprocess_320x512_antialias() -> None:
    """The real frame size downscales, so kornia's Gaussian antialias blur is exercised."""
    ref = load_file(str(PREPROCESS_320X512))
    x = (ref["src_uint8_hwc"].permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5  # ToTensor + Normalize(0.5, 0.5)
    with torch.device("meta"):
        image = ImageEncoder(builtin_config().image_encoder)
    assert image.image_size == ref["preprocessed"].shape[-1]
    result = compare("clip_preprocess_320x512", image.preprocess(x), ref["preprocessed"])
    assert result.passed, result


@pytest.mark.parametrize("directory", FIXTURE_DIRS, ids=_ids)
@torch.no_grad()
def test_image_encoder_parity(directory: Path) -> None:
    fx = _load_fixtures(directory)
    _require(fx, "pipe_keyframe_1", "pipe_keyframe_2", "clip_image_tokens")
    state = _checkpoint_with_towers(fx)
    with torch.device("meta"):
        image = ImageEncoder(fx.config.image_encoder)
    load_into(image, component_state_dict(state, "image_encoder"), "image_encoder")
    result = compare("clip_image_tokens", image(_image_inputs(fx)), fx["clip_image_tokens"])
    assert result.passed, result
    if fx.has("clip_image_preprocessed_0"):
        result = compare("clip_image_tokens[0] (from preprocessed)", image.encode_preprocessed(fx["clip_image_preprocessed_0"]), fx["clip_image_tokens"][:1])
        assert result.passed, result


@pytest.mark.parametrize("directory", FIXTURE_DIRS, ids=_ids)
@torch.no_grad()
def test_batched_bf16_towers_project_in_one_matmul_and_match_each_input_alone(directory: Path) -> None:
    """Several prompts / images at once in bf16: the attention's input projection must not fall back to a batched
    matmul over an expanded copy of its weight (what a strided [L, B, D] view did), and the batch changes nothing."""
    from torch.profiler import profile

    fx = _load_fixtures(directory)
    _require(fx, "clip_text_tokens", "pipe_keyframe_1", "pipe_keyframe_2")
    state = _checkpoint_with_towers(fx)
    text, image = _encoders(fx.config.text_encoder, fx.config.image_encoder,
                            component_state_dict(state, "text_encoder"), component_state_dict(state, "image_encoder"))
    text, image = text.to(torch.bfloat16), image.to(torch.bfloat16)
    # at least two of each, whatever the fixture set holds: its own inputs, then the same in reverse order
    tokens = torch.cat([fx["clip_text_tokens"], fx["clip_text_tokens"].flip(0)])
    pixels = torch.cat([_image_inputs(fx), _image_inputs(fx).flip(0)]).to(torch.bfloat16)
    with profile() as prof:
        text_out, image_out = text(tokens), image(pixels)
    ops = {event.key for event in prof.key_averages()}
    assert "aten::bmm" not in ops, sorted(ops)
    assert text_out.is_contiguous() and image_out.is_contiguous()
    for batched, tower, inputs in ((text_out, text, tokens), (image_out, image, pixels)):
        for i in range(inputs.shape[0]):
            torch.testing.assert_close(batched[i : i + 1], tower(inputs[i : i + 1]), rtol=2e-2, atol=2e-2)


# --- key sets and the OpenCLIP release mapping -----------------------------------------------


def test_full_size_key_sets() -> None:
    config = builtin_config()
    with torch.device("meta"):
        text, image = TextEncoder(config.text_encoder), ImageEncoder(config.image_encoder)
    for prefix, module in (("cond_stage_model.", text), ("embedder.", image)):
        ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert ours == _listing(prefix), prefix
        # open_clip's non-persistent causal mask would stay on meta after a strict load.
        assert "attn_mask" not in dict(module.named_buffers(remove_duplicate=False))


def test_open_clip_release_keys_map_onto_both_towers() -> None:
    config = builtin_config()
    with torch.device("meta"):
        release = build_open_clip(config.text_encoder).state_dict()  # the key layout of open_clip_pytorch_model.bin
    text_state, image_state = open_clip_state_to_components(release)
    assert {k: tuple(v.shape) for k, v in text_state.items()} == _listing("cond_stage_model.")
    assert {k: tuple(v.shape) for k, v in image_state.items()} == _listing("embedder.")
    with pytest.raises(ValueError):
        open_clip_state_to_components({k: v for k, v in release.items() if not k.startswith("visual.")})


@pytest.mark.parametrize("directory", FIXTURE_DIRS, ids=_ids)
@torch.no_grad()
def test_open_clip_release_round_trip(directory: Path) -> None:
    """Reassemble an OpenCLIP-format state dict from the fixture towers, split it, and reproduce the fixtures."""
    fx = _load_fixtures(directory)
    _require(fx, "clip_text_tokens", "clip_text_out", "pipe_keyframe_1", "pipe_keyframe_2", "clip_image_tokens")
    state = _checkpoint_with_towers(fx)
    text_part = component_state_dict(state, "text_encoder")
    image_part = component_state_dict(state, "image_encoder")
    release = {k[len("model."):]: v for k, v in text_part.items()}
    release.update({k[len("model."):]: v for k, v in image_part.items() if k.startswith("model.visual.")})
    text, image = _encoders(fx.config.text_encoder, fx.config.image_encoder, *open_clip_state_to_components(release))
    assert compare("clip_text_out", text(fx["clip_text_tokens"]), fx["clip_text_out"]).passed
    assert compare("clip_image_tokens", image(_image_inputs(fx)), fx["clip_image_tokens"]).passed


def test_custom_arch_does_not_touch_open_clip_registry() -> None:
    fx_config = json.loads((DEFAULT_FIXTURES / "tiny-clip-a.json").read_text())
    config = replace(builtin_config().text_encoder, arch="tooncrafter-test-arch", model_config=fx_config)
    with torch.device("meta"):
        text = TextEncoder(config)
    assert text.model.transformer.width == fx_config["text_cfg"]["width"]
    assert "tooncrafter-test-arch" not in open_clip.list_models()
    assert open_clip.get_model_config("tooncrafter-test-arch") is None


def test_unknown_arch_is_an_error() -> None:
    with pytest.raises(ValueError, match="no-such-arch"):
        TextEncoder(replace(builtin_config().text_encoder, arch="no-such-arch", model_config=None))
