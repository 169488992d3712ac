"""Reference fixture sets and the one comparison rule shared by the parity tests and `tooncrafter parity`.

A fixture directory (like `reference/tiny_a`) holds `config.yaml`, the OpenCLIP json it names,
`model.ckpt`, `fixtures.safetensors` and `fixtures_meta.json`. Tolerances follow section 9 of the
reference README: modules `1e-4 + 1e-4 * max|ref|`, pipeline `1e-3`, guided v `2e-3`, integers exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file

from tooncrafter.model.config import ToonCrafterConfig, load_config

# `../shared/reference/tiny_a` seen from the repository root (where the tests and CI run).
_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FIXTURES = _REPO_ROOT.parent / "shared" / "reference" / "tiny_a"

PIPELINE_TOLERANCE = 1e-3
GUIDED_TOLERANCE = 2e-3
SCHEDULE_TOLERANCE = 1e-6

# The settings of the reference pipeline runs (reference README, section 4): cfg 7.5 and, when a fixture
# does not store `pipe_fs`, fs 10.
FIXTURE_CFG_SCALE = 7.5
FIXTURE_FS = 10


def module_tolerance(ref: torch.Tensor) -> float:
    """Module-level bound: `1e-4 + 1e-4 * max|ref|`."""
    return 1e-4 + 1e-4 * float(ref.detach().abs().max()) if ref.numel() else 1e-4


@dataclass(frozen=True)
class Comparison:
    """One row of a parity report."""

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    tolerance: float
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return self.skipped is None and self.max_abs_error <= self.tolerance


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, tolerance: float | None = None) -> Comparison:
    """Max abs error of `ours` against `ref`; integer tensors must match exactly (tolerance 0)."""
    ours = ours.detach().cpu()
    ref = ref.detach().cpu()
    if tuple(ours.shape) != tuple(ref.shape):
        return Comparison(name, tuple(ref.shape), float("inf"), 0.0 if tolerance is None else tolerance)
    if not ref.is_floating_point():
        err = float((ours.to(torch.int64) - ref.to(torch.int64)).abs().max()) if ref.numel() else 0.0
        return Comparison(name, tuple(ref.shape), err, 0.0)
    if tolerance is None:
        tolerance = module_tolerance(ref)
    diff = (ours.double() - ref.double()).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    if torch.isnan(diff).any():
        err = float("nan")
    return Comparison(name, tuple(ref.shape), err if err == err else float("inf"), tolerance)


def skipped(name: str, reason: str) -> Comparison:
    return Comparison(name, (), 0.0, 0.0, skipped=reason)


def fixtures_dir_from_env() -> Path:
    """`TOONCRAFTER_PARITY_FIXTURES`, else the reference tiny_a set beside the repository."""
    return Path(os.environ.get("TOONCRAFTER_PARITY_FIXTURES", str(DEFAULT_FIXTURES)))


@dataclass
class FixtureSet:
    """The tensors, scalars and config of one fixture directory."""

    directory: Path
    config: ToonCrafterConfig
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | Path) -> "FixtureSet":
        directory = Path(directory)
        config_path = directory / "config.yaml"
        if not config_path.is_file():
            config_path = directory / "config.json"
        meta_path = directory / "fixtures_meta.json"
        return cls(
            directory=directory,
            config=load_config(config_path),
            tensors=load_file(str(directory / "fixtures.safetensors")),
            meta=json.loads(meta_path.read_text()) if meta_path.is_file() else {},
        )

    @property
    def checkpoint_path(self) -> Path:
        for name in ("model.ckpt", "model.safetensors"):
            if (self.directory / name).is_file():
                return self.directory / name
        raise FileNotFoundError(f"no model.ckpt or model.safetensors in {self.directory}")

    def has(self, *names: str) -> bool:
        return all(n in self.tensors for n in names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def random_state_dict(
    shapes: Mapping[str, Sequence[int]], seed: int, *, damped: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """Random float32 weights for a key layout, for fixtures made without real checkpoints.

    Each key draws from its own CPU generator seeded with `seed` and the key's CRC-32, so a value
    depends only on (seed, key, shape): a re-implementation with the same layout rebuilds the same
    weights in any order. Like `reference/tiny_a`: matrices and kernels `N(0, 1/fan_in)` (x0.5 for
    keys containing one of `damped`, the layers training initialises at zero), 1-D weights
    (norm scales) `1 + 0.1 N`, biases `0.05 N`.
    """
    state = {}
    for key in sorted(shapes):
        shape = tuple(int(n) for n in shapes[key])
        generator = torch.Generator("cpu").manual_seed((seed * 0x9E3779B1 + zlib.crc32(key.encode())) % 2**63)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if key.endswith(".bias"):
            value = 0.05 * noise
        elif len(shape) == 1:
            value = 1.0 + 0.1 * noise
        else:
            fan_in = math.prod(shape[1:])
            value = noise / math.sqrt(fan_in) * (0.5 if any(name in key for name in damped) else 1.0)
        state[key] = value
    return state


def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the keys, shapes and float32 bytes of a state dict (sorted by key)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
