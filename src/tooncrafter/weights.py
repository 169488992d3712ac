"""Find the weights: an explicit file or directory, else the Hugging Face cache, else a download.

`--checkpoint PATH` (or `TOONCRAFTER_CHECKPOINT`, read by the settings, not here) may name:
- a checkpoint file (`model.ckpt`, or a `.safetensors` with the same keys): the built-in 512 config;
- a directory holding `model.ckpt` / `model.safetensors` and, optionally, `config.yaml` (plus the
  OpenCLIP json it names), like `reference/tiny_a`; without a config the 512 config is used.
Nothing given: `Doubiiu/ToonCrafter`'s `model.ckpt` from the Hugging Face hub, downloaded once into
the HF cache. Offline and not cached is a `WeightsNotFoundError` that says how to fix it.

Hugging Face reads `HF_HUB_OFFLINE` and `HF_HUB_CACHE` once, when it is imported; this module reads
them again on every call (falling back to huggingface_hub's values), so a process that sets them
later, such as a test, is obeyed.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_REPO_ID = "Doubiiu/ToonCrafter"
DEFAULT_FILENAME = "model.ckpt"
# The sketch encoder's weights, released beside model.ckpt (needed only when sketches are given).
SKETCH_FILENAME = "sketch_encoder.ckpt"
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
# In a checkpoint directory: safetensors first (no pickle at all), then the official file.
DIRECTORY_WEIGHT_NAMES = ("model.safetensors", "model.ckpt")
DIRECTORY_CONFIG_NAMES = ("config.yaml", "config.json")

_HOW_TO_FIX = (
    "Pass --checkpoint PATH (or set TOONCRAFTER_CHECKPOINT) to an official model.ckpt, a .safetensors "
    "of the same keys, or a directory holding model.ckpt + config.yaml; or run once with network "
    "access (and without HF_HUB_OFFLINE) to download it into the Hugging Face cache."
)


_SKETCH_HOW_TO_FIX = (
    "Pass --sketch-checkpoint PATH (or set TOONCRAFTER_SKETCH_CHECKPOINT) to the released "
    f"{SKETCH_FILENAME} or a .safetensors of the same keys; or run once with network access (and without "
    "HF_HUB_OFFLINE) to download it into the Hugging Face cache."
)


class WeightsNotFoundError(ValueError):
    """No weights where they were asked for, and no way to fetch them."""


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where the weights are, and which config goes with them (None = the built-in 512 config)."""

    weights_path: Path
    config_path: Path | None
    directory: Path
    source: Literal["file", "directory", "hub"]


def resolve_checkpoint(
    checkpoint: str | Path | None,
    *,
    repo_id: str = DEFAULT_REPO_ID,
    filename: str = DEFAULT_FILENAME,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ResolvedCheckpoint:
    """Resolve `--checkpoint` (a file, a directory, or None for the hub) to files on disk.

    None: `repo_id`/`filename` from the HF cache if any revision-`main` copy is there (no network
    call), else downloaded into it; `progress=False` hides the download bar for this call only.
    """
    if checkpoint is None or str(checkpoint) == "":
        path = _hub_file(
            repo_id, [filename], revision=revision, cache_dir=cache_dir, progress=progress, what="ToonCrafter weights"
        )
        return ResolvedCheckpoint(weights_path=path, config_path=None, directory=path.parent, source="hub")

    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return _resolve_directory(path)
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise WeightsNotFoundError(
                f"--checkpoint {path} is not a checkpoint file (expected one of {', '.join(CHECKPOINT_SUFFIXES)}, "
                "or a directory holding model.ckpt + config.yaml)"
            )
        return ResolvedCheckpoint(weights_path=path, config_path=None, directory=path.parent, source="file")
    raise WeightsNotFoundError(f"--checkpoint {path}: no such file or directory. {_HOW_TO_FIX}")


def resolve_sketch_checkpoint(
    sketch_checkpoint: str | Path | None,
    *,
    repo_id: str = DEFAULT_REPO_ID,
    filename: str = SKETCH_FILENAME,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Resolve `--sketch-checkpoint` (a file, or None for the hub) to the sketch encoder's weights.

    None: `repo_id`/`filename` (the released `sketch_encoder.ckpt`) from the HF cache, else
    downloaded into it, exactly like `model.ckpt`; offline and not cached is an error naming
    `--sketch-checkpoint`. The lead's settings read `TOONCRAFTER_SKETCH_CHECKPOINT` into the argument.
    """
    if sketch_checkpoint is None or str(sketch_checkpoint) == "":
        return _hub_file(
            repo_id,
            [filename],
            revision=revision,
            cache_dir=cache_dir,
            progress=progress,
            what="sketch encoder weights",
            how_to_fix=_SKETCH_HOW_TO_FIX,
        )
    path = Path(sketch_checkpoint).expanduser()
    if path.is_dir():
        candidates = [path / SKETCH_FILENAME, path / (Path(SKETCH_FILENAME).stem + ".safetensors")]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise WeightsNotFoundError(
                f"--sketch-checkpoint {path} is a directory without {' or '.join(c.name for c in candidates)}. "
                f"{_SKETCH_HOW_TO_FIX}"
            )
        return found
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise WeightsNotFoundError(
                f"--sketch-checkpoint {path} is not a checkpoint file (expected one of {', '.join(CHECKPOINT_SUFFIXES)})"
            )
        return path
    raise WeightsNotFoundError(f"--sketch-checkpoint {path}: no such file or directory. {_SKETCH_HOW_TO_FIX}")


def _resolve_directory(directory: Path) -> ResolvedCheckpoint:
    weights = next((directory / n for n in DIRECTORY_WEIGHT_NAMES if (directory / n).is_file()), None)
    if weights is None:
        raise WeightsNotFoundError(
            f"--checkpoint {directory} is a directory without {' or '.join(DIRECTORY_WEIGHT_NAMES)}; "
            "point it at the checkpoint file itself or at a directory holding model.ckpt + config.yaml"
        )
    config = next((directory / n for n in DIRECTORY_CONFIG_NAMES if (directory / n).is_file()), None)
    if config is None:
        logger.info("no config.yaml in %s: assuming the built-in 512 config", directory)
    return ResolvedCheckpoint(weights_path=weights, config_path=config, directory=directory, source="directory")


def resolve_open_clip_weights(
    arch: str = "ViT-H-14",
    version: str = "laion2b_s32b_b79k",
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """The OpenCLIP release weights (for a checkpoint without the CLIP towers), from the HF cache or hub.

    Follows open_clip's own choice: the repo from `open_clip.pretrained.get_pretrained_cfg`, its
    safetensors file first, the `.bin` second.
    """
    from open_clip import pretrained as open_clip_pretrained  # heavy; only this path needs it

    cfg = open_clip_pretrained.get_pretrained_cfg(arch, version)
    hub_entry = (cfg or {}).get("hf_hub", "")
    if not hub_entry:
        raise WeightsNotFoundError(f"open_clip has no Hugging Face hub release for {arch} / {version}")
    # open_clip's convention: "org/name/" = the default file name, "org/name/file" = that file.
    repo_id, filename = os.path.split(hub_entry)
    filename = filename or open_clip_pretrained.HF_WEIGHTS_NAME
    candidates = [*_safetensors_alternatives(filename, open_clip_pretrained), filename]
    try:
        return _hub_file(
            repo_id, candidates, revision=None, cache_dir=cache_dir, progress=progress, what="OpenCLIP weights"
        )
    except WeightsNotFoundError as exc:
        raise WeightsNotFoundError(
            f"the checkpoint has no CLIP towers, so the OpenCLIP {arch} ({version}) release weights are needed: {exc}"
        ) from exc


def _safetensors_alternatives(filename: str, open_clip_pretrained: Any) -> list[str]:
    if filename == open_clip_pretrained.HF_WEIGHTS_NAME:
        return [open_clip_pretrained.HF_SAFE_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors"]
    return []


# --------------------------------------------------------------------------------------------
# Hugging Face hub
# --------------------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The HF hub cache as huggingface_hub resolves it, but from the environment of *now*."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(os.path.expanduser(explicit)))
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(env["HF_HOME"]))) / "hub"
    return Path(hf_constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set now or was set at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(hf_constants.HF_HUB_OFFLINE)


class _SilentTqdm(tqdm):
    """A progress bar that never draws: `progress=False` without huggingface_hub's global switch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


_ACCEPTS_TQDM_CLASS = "tqdm_class" in inspect.signature(hf_hub_download).parameters


def _hub_file(
    repo_id: str,
    filenames: Sequence[str],
    *,
    revision: str | None,
    cache_dir: str | Path | None,
    progress: bool,
    what: str,
    how_to_fix: str = _HOW_TO_FIX,
) -> Path:
    """The first of `filenames` in a hub repo: a cached copy without asking the hub, else a download.

    Cache first: a release's weights do not change, and asking the hub first would make every run
    on a machine without network wait for huggingface_hub's retries (about 20 s) before it falls
    back to the cache.
    """
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    common: dict[str, Any] = {"repo_id": repo_id, "revision": revision, "cache_dir": str(cache)}
    wanted = " or ".join(f"{repo_id}/{name}" for name in filenames)

    # 1. A cached copy of any candidate, no network.
    for name in filenames:
        try:
            return Path(hf_hub_download(filename=name, local_files_only=True, **common))
        except LocalEntryNotFoundError:
            continue
    if hub_offline():
        raise WeightsNotFoundError(
            f"{what} not found: {wanted} is not in the Hugging Face cache ({cache}) and offline mode is on "
            f"(HF_HUB_OFFLINE). {how_to_fix}"
        )

    # 2. Download the first candidate the hub has.
    if not progress and _ACCEPTS_TQDM_CLASS:
        common["tqdm_class"] = _SilentTqdm
    for name in filenames:
        where = f"{repo_id}/{name}"
        try:
            logger.info("downloading %s into %s", where, cache)
            return Path(hf_hub_download(filename=name, **common))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
            raise WeightsNotFoundError(
                f"{what} not found: {wanted} is not in the Hugging Face cache ({cache}) and the Hugging Face "
                f"hub cannot be reached. {how_to_fix}"
            ) from exc
        except EntryNotFoundError:
            logger.debug("%s does not exist on the hub", where)
            continue
        except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
            raise WeightsNotFoundError(f"{what}: the hub refused {where}: {exc}. {how_to_fix}") from exc
        except (HfHubHTTPError, OSError) as exc:
            raise WeightsNotFoundError(f"{what}: downloading {where} failed: {exc}. {how_to_fix}") from exc
    raise WeightsNotFoundError(f"{what}: {wanted} does not exist on the hub. {how_to_fix}")
