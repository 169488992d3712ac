"""Build every ToonCrafter component on the `meta` device and load it strictly from a state dict.

Each component is created without allocating memory, then receives its tensors straight on the
target device and dtype (`load_into`, `assign=True`). Every key of the checkpoint must land in some
component: keys that no component claims are an error, as are missing ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from tooncrafter.model.checkpoint import (
    CheckpointError,
    component_state_dict,
    format_keys,
    has_component,
    load_into,
    schedule_buffers,
    unknown_keys,
)
from tooncrafter.model.clip import ImageEncoder, TextEncoder
from tooncrafter.model.config import ToonCrafterConfig
from tooncrafter.model.resampler import Resampler
from tooncrafter.model.unet import UNet3D
from tooncrafter.model.vae import AutoencoderDualRef

logger = logging.getLogger(__name__)


@dataclass
class ToonCrafterComponents:
    """The loaded networks of one checkpoint. CLIP towers are None when neither the checkpoint nor
    a separate OpenCLIP state provided them (parity from given embeddings still works then)."""

    config: ToonCrafterConfig
    unet: UNet3D
    vae: AutoencoderDualRef
    resampler: Resampler
    text_encoder: TextEncoder | None
    image_encoder: ImageEncoder | None
    schedule_buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def has_clip(self) -> bool:
        return self.text_encoder is not None and self.image_encoder is not None

    def modules(self) -> dict[str, nn.Module]:
        found = {"unet": self.unet, "vae": self.vae, "resampler": self.resampler}
        if self.text_encoder is not None:
            found["text_encoder"] = self.text_encoder
        if self.image_encoder is not None:
            found["image_encoder"] = self.image_encoder
        return found


def _builders(config: ToonCrafterConfig) -> dict[str, Callable[[], nn.Module]]:
    return {
        "unet": lambda: UNet3D(config.unet, image_tokens_per_frame=config.resampler.num_queries),
        "vae": lambda: AutoencoderDualRef(config.vae),
        "resampler": lambda: Resampler(config.resampler),
        "text_encoder": lambda: TextEncoder(config.text_encoder),
        "image_encoder": lambda: ImageEncoder(config.image_encoder),
    }


def build_on_meta(config: ToonCrafterConfig, components: tuple[str, ...] | None = None) -> dict[str, nn.Module]:
    """Components (all by default) with their full parameter sets on `meta` (no memory used)."""
    builders = _builders(config)
    with torch.device("meta"):
        return {name: build() for name, build in builders.items() if components is None or name in components}


def _finish(module: nn.Module, device: torch.device | str) -> nn.Module:
    init = getattr(module, "init_non_persistent_buffers", None)
    if callable(init):
        init(torch.device(device))
    return module


def load_components(
    config: ToonCrafterConfig,
    state: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clip_states: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    components: tuple[str, ...] = ("unet", "vae", "resampler", "text_encoder", "image_encoder"),
) -> ToonCrafterComponents:
    """Load `components` from the official `state` (CLIP from `clip_states` when the checkpoint lacks it)."""
    stray = unknown_keys(state)
    if stray:
        raise CheckpointError(f"checkpoint has keys that belong to no ToonCrafter component: {format_keys(stray)}")
    builders = _builders(config)
    loaded: dict[str, nn.Module | None] = {}
    for name in ("unet", "vae", "resampler", "text_encoder", "image_encoder"):
        if name not in components:
            loaded[name] = None
            continue
        if has_component(state, name):
            component_state = component_state_dict(state, name)
        elif name in ("text_encoder", "image_encoder") and clip_states is not None:
            component_state = dict(clip_states[0] if name == "text_encoder" else clip_states[1])
        elif name in ("text_encoder", "image_encoder"):
            logger.info("checkpoint has no %s and no OpenCLIP weights were given: it stays unloaded", name)
            loaded[name] = None
            continue
        else:
            raise CheckpointError(f"checkpoint has no {name} weights (no key starts with the {name} prefix)")
        with torch.device("meta"):
            module = builders[name]()
        loaded[name] = _finish(load_into(module, component_state, name, device=device, dtype=dtype), device)
    for name in ("unet", "vae", "resampler"):
        if loaded.get(name) is None and name in components:
            raise CheckpointError(f"{name} could not be loaded")
    return ToonCrafterComponents(
        config=config,
        unet=loaded["unet"],  # type: ignore[arg-type]
        vae=loaded["vae"],  # type: ignore[arg-type]
        resampler=loaded["resampler"],  # type: ignore[arg-type]
        text_encoder=loaded["text_encoder"],  # type: ignore[arg-type]
        image_encoder=loaded["image_encoder"],  # type: ignore[arg-type]
        schedule_buffers={k: v.to(torch.float32) for k, v in schedule_buffers(state).items()},
    )
