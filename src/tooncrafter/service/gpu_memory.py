"""The GPU memory a worker uses, for /metrics: read at each check-in and stored in its `workers` row.

torch is imported only for a CUDA device, so a CPU worker (or a test's fake generator) reports
nothing and loads nothing here. The figures are those of PyTorch's caching allocator for this
process: `allocated` is what tensors hold now, `reserved` what the allocator holds from the driver
(what nvidia-smi shows for the process, less the CUDA context), `peak` the most ever allocated
since the process started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GpuMemory:
    allocated_bytes: int
    reserved_bytes: int
    peak_bytes: int


def is_cuda(device: object) -> bool:
    """`cuda`, `cuda:1` or a torch.device of type cuda."""
    return device is not None and str(device).split(":", 1)[0] == "cuda"


def generator_device(generator: object, configured: str | None) -> str | None:
    """The device a worker's generator runs on: the pipeline's placement, else the configured
    `TOONCRAFTER_DEVICE` (None or "auto" when neither says: then nothing is reported)."""
    device = getattr(getattr(generator, "placement", None), "device", None)
    return str(device) if device is not None else configured


def gpu_memory(device: object, cuda: Any = None) -> GpuMemory | None:
    """The caching allocator's figures on `device`; None unless it is a CUDA device.

    `cuda` is `torch.cuda` (imported here only then); any object with its three functions works."""
    if not is_cuda(device):
        return None
    if cuda is None:
        import torch

        cuda = torch.cuda
    where = str(device)
    return GpuMemory(
        allocated_bytes=int(cuda.memory_allocated(where)),
        reserved_bytes=int(cuda.memory_reserved(where)),
        peak_bytes=int(cuda.max_memory_allocated(where)),
    )
