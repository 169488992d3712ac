"""Reading official ToonCrafter checkpoints and loading them strictly, component by component.

This is the only module that knows the key prefixes of the official `LatentVisualDiffusion`
state dict. Files are read without executing pickled code (`weights_only=True`) and memory-mapped
(`mmap=True`, or safetensors), and modules are built on the `meta` device and receive the tensors
with `assign=True`: the weights are never held twice in RAM (a tensor converted to another dtype or
device gives its mapped source pages back at once, `mapped_pages.py`).
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from tooncrafter.model.mapped_pages import MappedPages

logger = logging.getLogger(__name__)

# component name -> key prefix in the official state dict
PREFIXES: dict[str, str] = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.",
    "image_encoder": "embedder.",
    "resampler": "image_proj_model.",
}
# The DDPM buffers stored at the top level; the sampler needs a few of them.
SCHEDULE_BUFFERS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "scale_arr",
)
_DEEPSPEED_PREFIX = "_forward_module."


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and the problem."""


def _read_pickle_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refusing to load: the file contains pickled code or objects that are not plain tensors "
            f"(only weights are accepted; convert it with a trusted tool first). Detail: {exc}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {exc}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return obj["state_dict"]
    if "module" in obj and isinstance(obj["module"], Mapping):
        # DeepSpeed layout: every key starts with `_forward_module.`
        return {k[len(_DEEPSPEED_PREFIX):] if k.startswith(_DEEPSPEED_PREFIX) else k: v for k, v in obj["module"].items()}
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path}: no 'state_dict' or 'module' entry and not a flat dict of tensors")


def _read_safetensors(path: Path) -> Mapping[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a `model.ckpt` or `.safetensors` file, memory-mapped, with legacy keys renamed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle_checkpoint(path)
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        # Older checkpoints call the fs embedding `framestride_embed` (the official loader renames it too).
        state[key.replace("framestride_embed", "fps_embedding")] = value
    return state


def component_state_dict(state: Mapping[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """The keys of one component with its prefix removed (empty when the checkpoint lacks it)."""
    prefix = PREFIXES[component]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def has_component(state: Mapping[str, torch.Tensor], component: str) -> bool:
    prefix = PREFIXES[component]
    return any(k.startswith(prefix) for k in state)


def schedule_buffers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The top-level DDPM buffers present in the checkpoint (`alphas_cumprod`, `scale_arr`, ...)."""
    return {k: state[k] for k in SCHEDULE_BUFFERS if k in state}


def unknown_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys that belong to no component and are no schedule buffer."""
    prefixes = tuple(PREFIXES.values())
    return sorted(k for k in state if not k.startswith(prefixes) and k not in SCHEDULE_BUFFERS)


def format_keys(keys: Iterable[str], limit: int = 20) -> str:
    """Sorted keys for an error message, the first `limit` of them and a count of the rest."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_into(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    component: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Strictly load `state` into `module` (typically built on `meta`), straight to `device`/`dtype`.

    Missing keys, unexpected keys and shape mismatches are errors listing the keys. Floating point
    tensors are cast to `dtype` (None keeps the checkpoint's dtype); integer buffers keep theirs.
    """
    # Components of the main checkpoint name keys with their prefix; a separate file (the sketch
    # encoder) has none.
    prefix = PREFIXES.get(component, "")
    expected = module.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {format_keys(prefix + k for k in missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {format_keys(prefix + k for k in unexpected)}")
        raise CheckpointError(f"{component}: checkpoint does not match the model ({'; '.join(parts)})")
    bad_shapes = [
        f"{prefix}{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad_shapes:
        raise CheckpointError(f"{component}: shape mismatch: {'; '.join(bad_shapes[:20])}")
    converted = {}
    mapped = MappedPages()
    for key, value in state.items():
        target_dtype = dtype if (dtype is not None and value.is_floating_point()) else value.dtype
        converted[key] = value.to(device=device, dtype=target_dtype)
        if converted[key].untyped_storage().data_ptr() != value.untyped_storage().data_ptr():
            # a converted copy: the source pages of a memory-mapped file are not needed again
            mapped.release(value)
    module.load_state_dict(converted, strict=True, assign=True)
    leftovers = [name for name, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{component}: tensors not set by the checkpoint nor computed by the model: {format_keys(leftovers)}")
    return module.eval().requires_grad_(False)


@dataclass
class CheckpointContents:
    """What `inspect_checkpoint` found: which components are present, for messages and `parity`."""

    path: Path
    components: tuple[str, ...]
    schedule: tuple[str, ...]
    unknown: tuple[str, ...]


def inspect_checkpoint(path: str | Path, state: Mapping[str, torch.Tensor] | None = None) -> CheckpointContents:
    state = read_state_dict(path) if state is None else state
    return CheckpointContents(
        path=Path(path),
        components=tuple(c for c in PREFIXES if has_component(state, c)),
        schedule=tuple(schedule_buffers(state)),
        unknown=tuple(unknown_keys(state)),
    )


def convert_to_safetensors(source: str | Path, target: str | Path, dtype: torch.dtype | None = None) -> int:
    """Write every tensor of `source` to a `.safetensors` file with the same keys; returns the count.

    `dtype` (e.g. bf16) casts the floating point weights, so that a low-precision pipeline reads half the bytes
    and holds no fp32 copy at all; the schedule buffers stay fp32 (the sampler's alphas need the precision).
    """
    from safetensors.torch import save_file

    state = read_state_dict(source)
    mapped = MappedPages()
    converted = {}
    for key, value in state.items():
        if dtype is not None and value.is_floating_point() and key not in SCHEDULE_BUFFERS:
            converted[key] = value.to(dtype).contiguous()
            mapped.release(value)  # the fp32 source pages are not needed again
        else:
            # safetensors refuses tensors sharing storage; the official checkpoint has none, but be safe.
            converted[key] = value.contiguous()
    save_file(converted, str(target), metadata={"format": "pt", "source": Path(source).name})
    return len(converted)
