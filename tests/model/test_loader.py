"""Strict loading: the full 512 key set, missing and unexpected keys, checkpoints without CLIP towers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from tooncrafter.model.checkpoint import (
    PREFIXES,
    SCHEDULE_BUFFERS,
    CheckpointError,
    read_state_dict,
)
from tooncrafter.model.config import builtin_config
from tooncrafter.model.loader import build_on_meta, load_components

REFERENCE_KEYS = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "tooncrafter_512_state_dict.json.gz"


def test_full_512_model_has_exactly_the_official_keys_and_shapes() -> None:
    if not REFERENCE_KEYS.is_file():
        pytest.skip("reference key listing not found")
    listing = json.loads(gzip.open(REFERENCE_KEYS).read())
    official = {entry["key"]: tuple(entry["shape"]) for entry in listing["keys"]}
    ours: dict[str, tuple[int, ...]] = {}
    for name, module in build_on_meta(builtin_config()).items():
        for key, tensor in module.state_dict().items():
            ours[PREFIXES[name] + key] = tuple(tensor.shape)
    ours.update({k: official[k] for k in SCHEDULE_BUFFERS if k in official})
    assert len(official) == listing["num_keys"] == 2668
    assert set(ours) == set(official), (sorted(set(official) - set(ours))[:10], sorted(set(ours) - set(official))[:10])
    assert {k: v for k, v in ours.items() if official[k] != v} == {}


@pytest.fixture(scope="module")
def state(fixture_set) -> dict[str, torch.Tensor]:
    return read_state_dict(fixture_set.checkpoint_path)


def test_missing_unet_key_is_named(fixture_set, state) -> None:
    broken = dict(state)
    victim = next(k for k in broken if k.startswith("model.diffusion_model.") and "temopral_conv" in k)
    del broken[victim]
    with pytest.raises(CheckpointError, match="missing keys") as info:
        load_components(fixture_set.config, broken)
    assert victim in str(info.value)


def test_extra_unet_key_is_named(fixture_set, state) -> None:
    broken = dict(state)
    broken["model.diffusion_model.surprise.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unexpected keys: model.diffusion_model.surprise.weight"):
        load_components(fixture_set.config, broken)


def test_key_of_no_component_is_named(fixture_set, state) -> None:
    broken = dict(state)
    broken["ema_model.decay"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="ema_model.decay"):
        load_components(fixture_set.config, broken)


def test_shape_mismatch_is_named(fixture_set, state) -> None:
    broken = dict(state)
    key = next(k for k in broken if k.startswith("image_proj_model.") and k.endswith("weight") and broken[k].ndim == 2)
    broken[key] = torch.zeros(broken[key].shape[0] + 1, broken[key].shape[1])
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_components(fixture_set.config, broken)


def test_checkpoint_without_clip_towers_loads_the_rest(fixture_set, state) -> None:
    pruned = {k: v for k, v in state.items() if not k.startswith(("cond_stage_model.", "embedder."))}
    components = load_components(fixture_set.config, pruned)
    assert not components.has_clip
    assert components.text_encoder is None and components.image_encoder is None


def test_weights_are_not_copied_on_cpu_fp32(fixture_set, state) -> None:
    """Loading to CPU fp32 assigns the memory-mapped tensors themselves: no second copy of the weights."""
    components = load_components(fixture_set.config, state)
    key = next(k for k in state if k.startswith("model.diffusion_model.") and k.endswith("weight"))
    param = components.unet.state_dict()[key[len("model.diffusion_model."):]]
    assert param.data_ptr() == state[key].data_ptr()


def test_loads_straight_to_another_dtype(fixture_set, state) -> None:
    components = load_components(fixture_set.config, state, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in components.unet.parameters())
    assert not any(p.is_meta for m in components.modules().values() for p in m.parameters())
