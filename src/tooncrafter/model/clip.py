"""The two OpenCLIP towers: the text encoder (`cond_stage_model`) and the image encoder (`embedder`).

Both wrap an `open_clip.model.CLIP` under the attribute `model`, as the official embedders do, so
the checkpoint keys `cond_stage_model.model.*` / `embedder.model.*` load with no rename:

* TextEncoder = CLIP without `visual` (official `FrozenOpenCLIPEmbedder`): token embedding +
  positions, the resblocks up to the penultimate one (layer "penultimate"), causal mask,
  `ln_final`; all 77 positions, no pooling, no projection. [B, 77] ids -> [B, 77, width].
* ImageEncoder = CLIP without the text `transformer` (official `FrozenOpenCLIPImageEmbedderV2`);
  the text leftovers stay so that the strict load works. Pixels in [-1, 1] -> kornia-style
  resize + CLIP normalisation -> patch embedding, class token, positions, `ln_pre`, all blocks;
  no `ln_post`, no `proj`. [B, 3, H, W] -> [B, 1 + patches, width].

The towers are built from `ClipConfig.model_config` when set (a custom arch such as the tiny test
towers) or from open_clip's registry config of `ClipConfig.arch`, without touching open_clip's
global registry. open_clip's non-persistent `attn_mask` buffer is removed (it would stay on the
meta device after a strict load); the causal mask is built in `forward` instead.

open_clip 2.26+ builds its transformer blocks batch-first (`[B, L, D]`); 2.22, the version the
official code was written for, sequence-first (`[L, B, D]`). `build_open_clip` makes every block's
attention sequence-first whatever the version, and `run_blocks` feeds it one contiguous `[L, B, D]`
block: a batch-first `nn.MultiheadAttention` transposes its input to a strided view, on which a bf16
`F.linear` on CPU falls back to a batched matmul over an expanded copy of the weight (the text
tower's input projection for two prompts: 0.48 s and a 484 MB copy per layer, against ~3 ms).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP
from torch import nn

from tooncrafter.model.clip_preprocess import clip_preprocess
from tooncrafter.model.config import ClipConfig

# Config keys that select another model class than the plain `CLIP` (not used by ToonCrafter).
_UNSUPPORTED_KEYS = ("custom_text", "multimodal_cfg")


def open_clip_model_config(config: ClipConfig) -> dict[str, Any]:
    """The OpenCLIP model config (a fresh copy): `config.model_config`, else open_clip's registry entry."""
    if config.model_config is not None:
        cfg = dict(config.model_config)
    else:
        cfg = open_clip.get_model_config(config.arch)  # returns a deep copy
        if cfg is None:
            raise ValueError(
                f"clip: unknown OpenCLIP architecture {config.arch!r} (not in open_clip's registry and no model_config given)"
            )
    cfg = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}
    for key in _UNSUPPORTED_KEYS:
        if cfg.get(key):
            raise ValueError(f"clip: {config.arch}: OpenCLIP option {key!r} is not supported (plain CLIP towers only)")
    for tower in ("text_cfg", "vision_cfg"):
        sub = cfg.get(tower) or {}
        for key in ("hf_model_name", "timm_model_name"):
            if sub.get(key):
                raise ValueError(f"clip: {config.arch}: {tower}.{key} is not supported (plain CLIP towers only)")
    if isinstance((cfg.get("vision_cfg") or {}).get("layers"), (list, tuple)):
        raise ValueError(f"clip: {config.arch}: ResNet vision towers are not supported")
    # Keys of open_clip's JSON files that are not constructor arguments.
    cfg.pop("custom_text", None)
    accepted = set(inspect.signature(CLIP.__init__).parameters) - {"self"}
    unknown = sorted(set(cfg) - accepted)
    if unknown:
        raise ValueError(f"clip: {config.arch}: OpenCLIP config has options this implementation does not know: {unknown}")
    return cfg


def build_open_clip(config: ClipConfig) -> CLIP:
    """An `open_clip.model.CLIP` on the current default device (use `torch.device("meta")` before a load)."""
    model = CLIP(**open_clip_model_config(config))
    # Non-persistent: never in a checkpoint, so it would stay on `meta`; the text encoder rebuilds it.
    model._buffers.pop("attn_mask", None)
    for transformer in (model.transformer, model.visual.transformer):
        _sequence_first(transformer)
    return model


def _sequence_first(transformer: nn.Module) -> None:
    """Make the blocks' attention take `[L, B, D]` (see the module docstring: the layout `run_blocks` feeds)."""
    for block in transformer.resblocks:
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            raise ValueError(f"clip: {type(block).__name__} blocks are not supported (plain attention blocks only)")
        block.attn.batch_first = False
    transformer.batch_first = False  # open_clip's own forward (encode_text/encode_image) then feeds that layout too


def run_blocks(transformer: nn.Module, x: torch.Tensor, count: int, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The first `count` resblocks of a sequence-first (`build_open_clip`) open_clip `Transformer` on x [B, L, D];
    returns a contiguous [B, L, D] (the linears that read it next want one as well)."""
    x = x.transpose(0, 1).contiguous()  # [B, L, D] -> [L, B, D]
    for block in transformer.resblocks[:count]:
        x = block(x, attn_mask=attn_mask)
    return x.transpose(0, 1).contiguous()


def causal_mask(length: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [L, L]: 0 on and below the diagonal, -inf above (what open_clip's `attn_mask` holds)."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)


class TextEncoder(nn.Module):
    """OpenCLIP text tower: prompts -> token ids [B, 77] -> hidden states [B, 77, width]."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        if config.layer not in ("last", "penultimate"):
            raise ValueError(f"clip text: layer={config.layer!r} is not supported (only 'last' or 'penultimate')")
        self.config = config
        model = build_open_clip(config)
        del model.visual
        self.model = model
        self.context_length: int = model.context_length
        # How many of the last resblocks to skip: "penultimate" stops one block early.
        self.skip_last = 1 if config.layer == "penultimate" else 0

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """open_clip's BPE tokenizer: SOT, ids, EOT, zero padding, truncated to the context length. int64 [B, 77]."""
        if isinstance(prompts, str):
            raise TypeError("clip text: tokenize expects a list of prompts, not a single string")
        return open_clip.tokenize(list(prompts), context_length=self.context_length)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> [B, L, width] (after the selected block and `ln_final`, all positions)."""
        model = self.model
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"clip text: expected token ids [B, {self.context_length}], got {tuple(tokens.shape)}")
        dtype = model.token_embedding.weight.dtype
        x = model.token_embedding(tokens.to(model.token_embedding.weight.device)) + model.positional_embedding.to(dtype)
        mask = causal_mask(x.shape[1], device=x.device, dtype=x.dtype)
        x = run_blocks(model.transformer, x, len(model.transformer.resblocks) - self.skip_last, attn_mask=mask)
        return model.ln_final(x)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> [B, 77, width] on the encoder's device."""
        return self(self.tokenize(prompts).to(self.model.token_embedding.weight.device))


class ImageEncoder(nn.Module):
    """OpenCLIP vision tower returning all tokens: images in [-1, 1] [B, 3, H, W] -> [B, 1 + patches, width]."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        if config.layer == "penultimate":
            raise ValueError("clip image: layer='penultimate' is not supported (the official image embedder refuses it too)")
        self.config = config
        model = build_open_clip(config)
        del model.transformer  # the text transformer; its embeddings, ln_final etc. stay (checkpoint keys)
        self.model = model
        self.image_size: int = model.visual.image_size[0]
        if model.visual.image_size[0] != model.visual.image_size[1]:
            raise ValueError(f"clip image: only square towers are supported, got image_size={model.visual.image_size}")

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised CLIP pixels [B, 3, S, S] (S = the tower's image_size)."""
        return clip_preprocess(x, self.image_size)

    def encode_preprocessed(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP pixels [B, 3, S, S] -> tokens [B, 1 + patches, width] after `ln_pre` and every block."""
        visual = self.model.visual
        dtype = visual.conv1.weight.dtype
        x = visual.conv1(pixels.to(device=visual.conv1.weight.device, dtype=dtype))  # [B, width, gh, gw]
        x = x.flatten(2).transpose(1, 2)  # [B, patches, width], row-major
        cls = visual.class_embedding.to(dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(dtype)
        x = visual.patch_dropout(x)
        x = visual.ln_pre(x)
        return run_blocks(visual.transformer, x, len(visual.transformer.resblocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_preprocessed(self.preprocess(x))


def open_clip_state_to_components(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an OpenCLIP release state dict (`open_clip_pytorch_model.bin` keys) into (text, image) tower states.

    The result uses the keys of `TextEncoder` / `ImageEncoder` (`model.*`), i.e. the official
    checkpoint's `cond_stage_model.*` / `embedder.*` with the prefix removed, ready for `load_into`.
    The text tower is everything but `visual.*`; the image tower everything but the text
    `transformer.*` (shared tensors such as `token_embedding` appear in both).
    """
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    flat: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key == "attn_mask":  # non-persistent in open_clip; older exports may carry it
            continue
        flat[key] = value
    if not any(k.startswith("visual.") for k in flat) or not any(k.startswith("transformer.") for k in flat):
        raise ValueError("clip: not an OpenCLIP CLIP state dict (expected both 'visual.*' and 'transformer.*' keys)")
    text = {f"model.{k}": v for k, v in flat.items() if not k.startswith("visual.")}
    image = {f"model.{k}": v for k, v in flat.items() if not k.startswith("transformer.")}
    return text, image
