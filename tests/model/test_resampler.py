"""Image-token Resampler: parity with the official fixtures and the full-size key set."""

from __future__ import annotations

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
from tooncrafter.model.attention import math_attention, set_attention_function
from tooncrafter.model.checkpoint import (
    component_state_dict,
    load_into,
    read_state_dict,
)
from tooncrafter.model.config import builtin_config
from tooncrafter.model.resampler import Resampler

STATE_DICT_LISTING = DEFAULT_FIXTURES.parent / "tooncrafter_512_state_dict.json.gz"
FIXTURE_DIRS = [fixtures_dir_from_env()]


def _load_fixtures(directory: Path) -> FixtureSet:
    if not (Path(directory) / "fixtures.safetensors").is_file():
        pytest.skip(f"no fixture set at {directory}")
    fx = FixtureSet.load(directory)
    if not fx.has("resampler_in", "resampler_out"):
        pytest.skip(f"{directory} has no Resampler fixtures")
    return fx


def _resampler(fx: FixtureSet) -> Resampler:
    with torch.device("meta"):
        model = Resampler(fx.config.resampler)
    return load_into(model, component_state_dict(read_state_dict(fx.checkpoint_path), "resampler"), "resampler")


@pytest.mark.parametrize("directory", FIXTURE_DIRS, ids=lambda d: Path(d).name)
@torch.no_grad()
def test_resampler_parity(directory: Path) -> None:
    fx = _load_fixtures(directory)
    model = _resampler(fx)
    out = model(fx["resampler_in"])
    cfg = fx.config.resampler
    assert out.shape == (fx["resampler_in"].shape[0], cfg.num_queries * cfg.video_length, cfg.output_dim)
    result = compare("resampler_out", out, fx["resampler_out"])
    assert result.passed, result
    # The plain softmax formulation the official code uses gives the same numbers.
    set_attention_function(model, math_attention)
    result = compare("resampler_out (math attention)", model(fx["resampler_in"]), fx["resampler_out"])
    assert result.passed, result


@pytest.mark.parametrize("directory", FIXTURE_DIRS, ids=lambda d: Path(d).name)
@torch.no_grad()
def test_resampler_pipeline_tokens(directory: Path) -> None:
    fx = _load_fixtures(directory)
    if not fx.has("pipe_clip_image_tokens_cond", "pipe_resampler_out_cond"):
        pytest.skip("no pipeline Resampler fixtures")
    model = _resampler(fx)
    for branch in ("cond", "uncond"):
        result = compare(
            f"pipe_resampler_out_{branch}", model(fx[f"pipe_clip_image_tokens_{branch}"]), fx[f"pipe_resampler_out_{branch}"]
        )
        assert result.passed, result


def test_resampler_rejects_wrong_width() -> None:
    cfg = builtin_config().resampler
    with torch.device("meta"):
        model = Resampler(cfg)
    with pytest.raises(ValueError, match=str(cfg.embedding_dim)):
        model(torch.zeros(1, 257, cfg.embedding_dim + 1, device="meta"))


def test_resampler_full_size_keys() -> None:
    listing = json.loads(gzip.decompress(STATE_DICT_LISTING.read_bytes()))
    prefix = "image_proj_model."
    expected = {e["key"][len(prefix):]: tuple(e["shape"]) for e in listing["keys"] if e["key"].startswith(prefix)}
    with torch.device("meta"):
        model = Resampler(builtin_config().resampler)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected
