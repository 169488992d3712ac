"""Checkpoint files: layouts we accept and files we refuse with a clear message."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from tooncrafter.model.checkpoint import (
    CheckpointError,
    component_state_dict,
    convert_to_safetensors,
    inspect_checkpoint,
    read_state_dict,
    schedule_buffers,
)


def _small_state() -> dict[str, torch.Tensor]:
    return {
        "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3),
        "first_stage_model.framestride_embed.0.weight": torch.randn(3, 3),
        "alphas_cumprod": torch.linspace(1, 0, 10),
    }


def test_reads_the_official_state_dict_layout(fixture_set) -> None:
    state = read_state_dict(fixture_set.checkpoint_path)
    contents = inspect_checkpoint(fixture_set.checkpoint_path, state)
    assert {"unet", "vae", "resampler"} <= set(contents.components)
    assert "alphas_cumprod" in schedule_buffers(state) and "scale_arr" in schedule_buffers(state)
    assert contents.unknown == ()
    assert all(not k.startswith("model.diffusion_model.") for k in component_state_dict(state, "unet"))


def test_deepspeed_layout_and_legacy_fs_name(tmp_path: Path) -> None:
    path = tmp_path / "ds.ckpt"
    torch.save({"module": {"_forward_module." + k: v for k, v in _small_state().items()}}, path)
    state = read_state_dict(path)
    assert "model.diffusion_model.out.2.weight" in state
    assert "first_stage_model.fps_embedding.0.weight" in state  # framestride_embed renamed


def test_safetensors_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "model.ckpt"
    torch.save({"state_dict": _small_state()}, source)
    target = tmp_path / "model.safetensors"
    assert convert_to_safetensors(source, target) == 3
    a, b = read_state_dict(source), read_state_dict(target)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_file_is_a_clear_error(tmp_path: Path, fixture_set) -> None:
    data = fixture_set.checkpoint_path.read_bytes()
    path = tmp_path / "model.ckpt"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(broken)


class _Payload:
    """Unpickling this would run `os.system`: weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="pickled code"):
        read_state_dict(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_state_dict(tmp_path / "nope.ckpt")


def test_convert_to_bf16_casts_weights_but_keeps_the_schedule_fp32(fixture_set, tmp_path: Path) -> None:
    from tooncrafter.model.checkpoint import SCHEDULE_BUFFERS, convert_to_safetensors, read_state_dict

    out = tmp_path / "model.safetensors"
    convert_to_safetensors(fixture_set.checkpoint_path, out, dtype=torch.bfloat16)
    source, converted = read_state_dict(fixture_set.checkpoint_path), read_state_dict(out)
    assert source.keys() == converted.keys()
    for key, value in source.items():
        if key in SCHEDULE_BUFFERS or not value.is_floating_point():
            assert converted[key].dtype == value.dtype and torch.equal(converted[key], value), key
        else:
            assert converted[key].dtype == torch.bfloat16, key
            assert torch.equal(converted[key], value.to(torch.bfloat16)), key
