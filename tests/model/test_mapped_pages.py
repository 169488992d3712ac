"""Releasing the pages of a memory-mapped checkpoint: memory comes back, data stays right, heap is untouched."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from tooncrafter.model.checkpoint import load_into
from tooncrafter.model.mapped_pages import PAGE, MappedPages, release_module_pages

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux")


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


def _mapped(tmp_path, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    original = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    torch.save({"w": original}, tmp_path / "w.ckpt")
    return torch.load(tmp_path / "w.ckpt", mmap=True, weights_only=True)["w"], original


@linux_only
def test_release_gives_memory_back_and_data_reads_again(tmp_path):
    mapped, original = _mapped(tmp_path, 16 * 2**20)  # 64 MB
    assert torch.equal(mapped, original)  # every page touched: resident
    before = _rss_kb()
    pages = MappedPages()
    pages.release(mapped)
    assert pages.released_bytes > 60 * 2**20
    assert before - _rss_kb() > 30 * 2**10  # at least half of it left the process
    assert torch.equal(mapped, original)  # a later read faults the file's pages back in


@linux_only
def test_heap_tensors_are_never_released():
    heap = torch.arange(4 * 2**20, dtype=torch.float32)
    pages = MappedPages()
    pages.release(heap)
    assert pages.released_bytes == 0
    assert torch.equal(heap, torch.arange(4 * 2**20, dtype=torch.float32))


@linux_only
def test_load_into_with_conversion_releases_the_mapped_source(tmp_path):
    layer = nn.Linear(2048, 2048)
    torch.save(layer.state_dict(), tmp_path / "layer.ckpt")
    state = torch.load(tmp_path / "layer.ckpt", mmap=True, weights_only=True)
    with torch.device("meta"):
        target = nn.Linear(2048, 2048)
    before = _rss_kb()
    load_into(target, state, "unet", dtype=torch.bfloat16)
    grown_kb = _rss_kb() - before
    # the bf16 copy (8 MB) stays, the 16 MB of fp32 source pages read for it do not
    assert grown_kb < 12 * 2**10
    assert target.weight.dtype == torch.bfloat16
    assert torch.equal(target.weight, layer.weight.detach().to(torch.bfloat16))


@linux_only
def test_release_module_pages_gives_back_a_mapped_component_and_it_still_runs(tmp_path):
    layer = nn.Linear(1024, 1024)
    torch.save(layer.state_dict(), tmp_path / "layer.ckpt")
    state = torch.load(tmp_path / "layer.ckpt", mmap=True, weights_only=True)
    with torch.device("meta"):
        mapped = nn.Linear(1024, 1024)
    mapped.load_state_dict(state, assign=True)
    x = torch.randn(3, 1024)
    expected = layer(x)
    assert torch.equal(mapped(x), expected)  # pages touched
    assert release_module_pages(mapped) >= 1024 * 1024 * 4 - 2 * PAGE
    assert torch.equal(mapped(x), expected)  # read back from the file
    assert release_module_pages(nn.Linear(1024, 1024)) == 0  # heap weights: never
