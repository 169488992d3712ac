"""The official YAML format parses into typed configs; unsupported options fail by name."""

from __future__ import annotations

import copy

import pytest
import yaml

from tooncrafter.fixtures import fixtures_dir_from_env
from tooncrafter.model.config import ConfigError, builtin_config, config_from_dict, load_config


def _raw_fixture_config() -> dict:
    return yaml.safe_load((fixtures_dir_from_env() / "config.yaml").read_text())


def test_builtin_config_is_the_released_512_model() -> None:
    config = builtin_config()
    assert config.num_frames == 16
    assert config.pixel_size == (320, 512)
    assert config.unet.model_channels == 320 and config.unet.context_dim == 1024
    assert config.resampler.embedding_dim == 1280
    assert config.text_encoder.arch == "ViT-H-14" and config.text_encoder.layer == "penultimate"


def test_fixture_config_reads_sizes_from_the_file() -> None:
    config = load_config(fixtures_dir_from_env() / "config.yaml")
    raw = _raw_fixture_config()["model"]["params"]
    assert config.latent_size == tuple(raw["image_size"])
    assert config.num_frames == raw["unet_config"]["params"]["temporal_length"]
    # the OpenCLIP json named by `arch` is picked up from the same directory when it is there
    arch_json = fixtures_dir_from_env() / f"{config.text_encoder.arch}.json"
    assert (config.text_encoder.model_config is not None) == arch_json.is_file()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("unet_config", "params", "use_scale_shift_norm"), True, "use_scale_shift_norm"),
        (("unet_config", "params", "use_relative_position"), True, "use_relative_position"),
        (("unet_config", "params", "some_new_flag"), 1, "some_new_flag"),
        (("unet_config", "target"), "other.UNet", "unet_config.target"),
        (("conditioning_key",), "crossattn", "conditioning_key"),
        (("parameterization",), "eps", "parameterization"),
        (("uncond_type",), "zero_embed", "uncond_type"),
        (("perframe_ae",), False, "perframe_ae"),
        (("cond_stage_config", "params", "layer"), "pooled", "cond_stage_config.layer"),
        (("img_cond_stage_config", "params", "layer"), "penultimate", "img_cond_stage_config.layer"),
        (("unet_config", "params", "use_causal_attention"), True, "use_causal_attention"),
    ],
)
def test_unsupported_options_are_refused_by_name(path: tuple[str, ...], value: object, message: str) -> None:
    raw = copy.deepcopy(_raw_fixture_config())
    node = raw["model"]["params"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_the_image_tower_layer_is_read_as_pooled() -> None:
    assert load_config(fixtures_dir_from_env() / "config.yaml").image_encoder.layer == "pooled"


def test_mismatched_frame_counts_are_refused() -> None:
    raw = copy.deepcopy(_raw_fixture_config())
    raw["model"]["params"]["image_proj_stage_config"]["params"]["video_length"] += 1
    with pytest.raises(ValueError, match="video_length"):
        config_from_dict(raw)
