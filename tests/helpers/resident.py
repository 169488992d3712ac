"""Which pages of a CPU tensor are mapped into this process right now, from `/proc/self/pagemap` (Linux only).

Bit 63 of a page's pagemap entry says the page is present in this process's page tables: what
`madvise(MADV_DONTNEED)` takes away and the next read faults back in. Only the pages wholly inside a
tensor's storage are looked at (a page at its edge may belong to a neighbour too).
"""

from __future__ import annotations

import mmap
import struct
import sys

import torch

PAGE = mmap.PAGESIZE
AVAILABLE = sys.platform.startswith("linux")


def whole_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """(whole pages of the tensor's storage, how many of them are present)."""
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    first, end = -(-start // PAGE), (start + size) // PAGE
    if end <= first:
        return 0, 0
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = pagemap.read((end - first) * 8)
    return end - first, sum(entry >> 63 for (entry,) in struct.iter_unpack("<Q", entries))


def module_pages(module: torch.nn.Module) -> tuple[int, int]:
    """(whole pages under the module's CPU parameters, how many of them are present)."""
    counts = [whole_pages(p) for p in module.parameters() if p.device.type == "cpu"]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)
