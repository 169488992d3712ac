"""Model configuration: frozen dataclasses parsed once from the official YAML format.

The official repository describes a model with a nested YAML (`model.params.unet_config.params`,
...). We read that format at the edge, check every option that changes behaviour, and hand the
rest of the code plain typed dataclasses. Nothing below this module walks a dict.

Options the official classes accept but ToonCrafter never uses (scale-shift norm, relative
position in temporal attention, ...) are refused with a ValueError naming the option, instead of
being silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

# The image tokens per frame produced by the Resampler (`num_queries`) and the text tokens are
# both read from the config; these are only the names of the official classes we understand.
_UNET_TARGET = "lvdm.modules.networks.openaimodel3d.UNetModel"
_VAE_TARGET = "lvdm.models.autoencoder.AutoencoderKL_Dualref"
_TEXT_TARGET = "lvdm.modules.encoders.condition.FrozenOpenCLIPEmbedder"
_IMAGE_TARGET = "lvdm.modules.encoders.condition.FrozenOpenCLIPImageEmbedderV2"
_RESAMPLER_TARGET = "lvdm.modules.encoders.resampler.Resampler"


class ConfigError(ValueError):
    """A model config this implementation cannot run as written (it names the option)."""


@dataclass(frozen=True)
class UNetConfig:
    """Arguments of the official `UNetModel` that ToonCrafter's 3D UNet uses."""

    in_channels: int
    out_channels: int
    model_channels: int
    attention_resolutions: tuple[int, ...]
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    num_head_channels: int
    context_dim: int
    temporal_length: int
    dropout: float = 0.0
    num_heads: int = -1
    transformer_depth: int = 1
    use_linear: bool = True
    temporal_conv: bool = True
    temporal_attention: bool = True
    temporal_selfatt_only: bool = True
    use_causal_attention: bool = False
    addition_attention: bool = True
    image_cross_attention: bool = True
    default_fs: int = 24
    fs_condition: bool = True
    conv_resample: bool = True

    def __post_init__(self) -> None:
        if self.use_causal_attention:
            raise ConfigError("unet: use_causal_attention=True is not supported (temporal attention is bidirectional)")
        if self.addition_attention and not self.temporal_selfatt_only:
            raise ConfigError("unet: temporal_selfatt_only=False is not supported (temporal layers are self-attention only)")
        if self.num_head_channels <= 0 and self.num_heads <= 0:
            raise ConfigError("unet: one of num_head_channels or num_heads must be positive")
        if not self.channel_mult:
            raise ConfigError("unet: channel_mult must not be empty")

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of an attention layer with `channels` channels, as the official code picks them."""
        if self.num_head_channels > 0:
            if channels % self.num_head_channels:
                raise ConfigError(
                    f"unet: {channels} channels are not divisible by num_head_channels={self.num_head_channels}"
                )
            return channels // self.num_head_channels, self.num_head_channels
        if channels % self.num_heads:
            raise ConfigError(f"unet: {channels} channels are not divisible by num_heads={self.num_heads}")
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """The `ddconfig` of `AutoencoderKL_Dualref` plus its `embed_dim`."""

    embed_dim: int
    z_channels: int
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    double_z: bool = True
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.double_z:
            raise ConfigError("vae: only double_z=True (a KL autoencoder) is supported")
        if self.attn_resolutions:
            raise ConfigError("vae: attn_resolutions must be empty (ToonCrafter's VAE has attention only in the middle)")


@dataclass(frozen=True)
class ResamplerConfig:
    """Arguments of the official image-token `Resampler`."""

    dim: int
    depth: int
    dim_head: int
    heads: int
    num_queries: int
    embedding_dim: int
    output_dim: int
    ff_mult: int
    video_length: int


ClipLayer = Literal["last", "penultimate", "pooled"]
"""Which output of an OpenCLIP tower is used: the text tower's last or penultimate layer; the image tower's
`pooled` (the official `FrozenOpenCLIPImageEmbedderV2` option, whose output is all its tokens)."""

# The layers each tower implements, by the official config key of the tower.
_CLIP_LAYERS = {"cond_stage_config": ("last", "penultimate"), "img_cond_stage_config": ("pooled",)}


@dataclass(frozen=True)
class ClipConfig:
    """Which OpenCLIP architecture to build; `model_config` is set for a custom (non-registry) arch."""

    arch: str = "ViT-H-14"
    version: str | None = "laion2b_s32b_b79k"
    layer: ClipLayer = "penultimate"
    model_config: dict[str, Any] | None = field(default=None, compare=False, hash=False)


@dataclass(frozen=True)
class DiffusionConfig:
    """The `LatentVisualDiffusion` parameters that shape inference."""

    image_size: tuple[int, int]  # latent (h, w)
    channels: int
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    rescale_betas_zero_snr: bool = True
    scale_factor: float = 0.18215
    use_dynamic_rescale: bool = True
    base_scale: float = 0.7


@dataclass(frozen=True)
class ToonCrafterConfig:
    """Everything needed to build and run one ToonCrafter model."""

    diffusion: DiffusionConfig
    unet: UNetConfig
    vae: VAEConfig
    resampler: ResamplerConfig
    text_encoder: ClipConfig
    image_encoder: ClipConfig

    @property
    def num_frames(self) -> int:
        """T, the number of frames the model samples in one window."""
        return self.unet.temporal_length

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.diffusion.image_size

    @property
    def vae_downsample(self) -> int:
        return 2 ** (len(self.vae.ch_mult) - 1)

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(H, W) of the frames the model makes."""
        h, w = self.diffusion.image_size
        return h * self.vae_downsample, w * self.vae_downsample


def _params(node: dict[str, Any], expected_target: str, name: str) -> dict[str, Any]:
    target = node.get("target")
    if target != expected_target:
        raise ConfigError(f"config: {name}.target is {target!r}, expected {expected_target!r}")
    return dict(node.get("params") or {})


def _take(params: dict[str, Any], cls: type, name: str, ignore: set[str] = frozenset(), refuse: dict[str, Any] | None = None) -> Any:
    """Build `cls` from `params`, refusing unknown options and unsupported values by name."""
    for key, supported in (refuse or {}).items():
        if key in params and params[key] != supported:
            raise ConfigError(f"config: {name}.{key}={params[key]!r} is not supported (only {supported!r})")
    fields = set(cls.__dataclass_fields__)
    known = fields | ignore | set(refuse or {})
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"config: {name} has options this implementation does not know: {unknown}")
    kwargs = {}
    for key in fields & set(params):
        value = params[key]
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def _clip_config(params: dict[str, Any], open_clip_configs: dict[str, Any], name: str, default_layer: str) -> ClipConfig:
    arch = params.get("arch", "ViT-H-14")
    version = params.get("version", "laion2b_s32b_b79k")
    layer = params.get("layer", default_layer)
    if layer not in _CLIP_LAYERS[name]:
        raise ConfigError(f"config: {name}.layer={layer!r} is not supported (only {' or '.join(map(repr, _CLIP_LAYERS[name]))})")
    return ClipConfig(arch=arch, version=version, layer=layer, model_config=open_clip_configs.get(arch))


def config_from_dict(raw: dict[str, Any], open_clip_configs: dict[str, Any] | None = None) -> ToonCrafterConfig:
    """Parse the official nested config (as loaded from YAML or JSON) into a `ToonCrafterConfig`."""
    open_clip_configs = dict(open_clip_configs or {})
    open_clip_configs.update(raw.get("open_clip_model_configs") or {})
    model = raw.get("model", raw)
    params = dict(model.get("params") or {})

    unet = _take(
        _params(params.pop("unet_config"), _UNET_TARGET, "unet_config"),
        UNetConfig,
        "unet_config",
        ignore={"use_checkpoint", "use_fp16", "dims"},
        refuse={
            "use_scale_shift_norm": False,
            "resblock_updown": False,
            "use_relative_position": False,
            "tempspatial_aware": False,
            "image_cross_attention_scale_learnable": False,
            "num_classes": None,
        },
    )
    vae_params = _params(params.pop("first_stage_config"), _VAE_TARGET, "first_stage_config")
    ddconfig = dict(vae_params.pop("ddconfig"))
    ddconfig["embed_dim"] = vae_params.pop("embed_dim")
    vae = _take(ddconfig, VAEConfig, "first_stage_config.ddconfig", ignore={"resolution"})
    text = _clip_config(
        _params(params.pop("cond_stage_config"), _TEXT_TARGET, "cond_stage_config"), open_clip_configs, "cond_stage_config", "last"
    )
    image = _clip_config(
        _params(params.pop("img_cond_stage_config"), _IMAGE_TARGET, "img_cond_stage_config"),
        open_clip_configs,
        "img_cond_stage_config",
        "pooled",
    )
    resampler = _take(
        _params(params.pop("image_proj_stage_config"), _RESAMPLER_TARGET, "image_proj_stage_config"),
        ResamplerConfig,
        "image_proj_stage_config",
    )
    if params.get("conditioning_key", "hybrid") != "hybrid":
        raise ConfigError(f"config: conditioning_key={params['conditioning_key']!r} is not supported (only 'hybrid')")
    if params.get("fps_condition_type", "fps") != "fps":
        raise ConfigError("config: only fps_condition_type='fps' is supported")
    diffusion = _take(
        params,
        DiffusionConfig,
        "model.params",
        ignore={
            "num_timesteps_cond", "first_stage_key", "cond_stage_key", "cond_stage_trainable", "conditioning_key",
            "scale_by_std", "use_ema", "fps_condition_type", "loop_video", "monitor", "logdir", "ckpt_path",
            "log_every_t", "scheduler_config", "empty_params_only", "use_scale",
        },
        # read by the official model and implemented here with exactly these values: v-prediction, the empty
        # prompt as the unconditional text, per-frame VAE encode/decode
        refuse={"parameterization": "v", "uncond_type": "empty_seq", "perframe_ae": True},
    )
    if resampler.video_length != unet.temporal_length:
        raise ConfigError(
            f"config: image_proj_stage_config.video_length={resampler.video_length} must equal "
            f"unet_config.temporal_length={unet.temporal_length}"
        )
    if resampler.output_dim != unet.context_dim:
        raise ConfigError(
            f"config: image_proj_stage_config.output_dim={resampler.output_dim} must equal "
            f"unet_config.context_dim={unet.context_dim}"
        )
    if unet.in_channels != 2 * diffusion.channels or unet.out_channels != diffusion.channels:
        raise ConfigError(
            f"config: unet in/out channels ({unet.in_channels}/{unet.out_channels}) must be "
            f"2x/1x the latent channels ({diffusion.channels}) for hybrid conditioning"
        )
    return ToonCrafterConfig(diffusion=diffusion, unet=unet, vae=vae, resampler=resampler, text_encoder=text, image_encoder=image)


def load_config(path: str | Path) -> ToonCrafterConfig:
    """Read a config file (official YAML, or the JSON form) and the OpenCLIP json files beside it."""
    path = Path(path)
    text = path.read_text()
    raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    open_clip_configs: dict[str, Any] = {}
    model_params = (raw.get("model") or {}).get("params") or {}
    for key in ("cond_stage_config", "img_cond_stage_config"):
        arch = ((model_params.get(key) or {}).get("params") or {}).get("arch")
        candidate = path.parent / f"{arch}.json" if arch else None
        if candidate is not None and candidate.is_file():
            open_clip_configs[arch] = json.loads(candidate.read_text())
    return config_from_dict(raw, open_clip_configs)


def builtin_config(name: str = "tooncrafter_512") -> ToonCrafterConfig:
    """The config that ships with the package (the official `inference_512_v1.0.yaml`)."""
    text = resources.files("tooncrafter.configs").joinpath(f"{name}.yaml").read_text()
    return config_from_dict(yaml.safe_load(text))
