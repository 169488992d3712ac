"""Where the model runs: device, dtype, and whether idle components wait on the CPU (`offload`).

One small value shared by the pipeline's steps (conditioning, decoding), so each step moves its
component in and out the same way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto" -> cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None or "auto" -> float16 on CUDA, float32 elsewhere; names as the CLI and settings spell them."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}") from None


@dataclass(frozen=True)
class Placement:
    """The compute device and dtype; with `offload`, components live on the CPU until used."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    offload: bool = False

    @contextlib.contextmanager
    def resident(self, module: nn.Module | None) -> Iterator[None]:
        """With `offload`, move a component to the compute device only while it is used."""
        if module is None or not self.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
