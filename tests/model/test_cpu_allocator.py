"""Inside a request large CPU tensors reuse freed heap memory; after it, the memory goes back to the system."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading

import pytest
import torch

from tooncrafter import cpu_allocator

glibc_only = pytest.mark.skipif(cpu_allocator._LIBC is None, reason="mallopt/malloc_trim are glibc")
BIG = 32 * 2**20  # floats: 128 MB, far above glibc's largest mmap threshold


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


_MAPPED_BLOCKS_SCRIPT = """
import ctypes, json, torch
from tooncrafter import cpu_allocator

class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

cpu_allocator._LIBC.mallinfo2.restype = MallInfo

def mapped_blocks_while_alive():
    tensor = torch.ones(%d)
    return cpu_allocator._LIBC.mallinfo2().hblks

baseline = cpu_allocator._LIBC.mallinfo2().hblks
out = {"baseline": baseline, "outside": mapped_blocks_while_alive()}
with cpu_allocator.reuse_freed_memory():
    out["inside"] = mapped_blocks_while_alive()
out["after"] = mapped_blocks_while_alive()
print(json.dumps(out))
"""


@glibc_only
def test_inside_a_request_large_blocks_come_from_the_heap_not_from_fresh_mappings():
    """glibc's own count of mmap'd blocks while a large tensor is alive. In a fresh process, so that the main
    thread is on the main arena (a thread that contention moved to another arena, like a service worker
    thread, still gets mmap for blocks over 64 MB: its heaps cannot hold them)."""
    run = subprocess.run([sys.executable, "-c", _MAPPED_BLOCKS_SCRIPT % BIG], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    blocks = json.loads(run.stdout.strip().splitlines()[-1])
    assert blocks["outside"] == blocks["baseline"] + 1  # default glibc: its own fresh mapping, zeroed on first touch
    assert blocks["inside"] == blocks["baseline"]  # from the heap, whose freed blocks later requests reuse
    assert blocks["after"] == blocks["baseline"] + 1  # settings restored


@glibc_only
def test_memory_is_handed_back_when_the_last_request_leaves():
    with cpu_allocator.reuse_freed_memory():
        torch.ones(BIG)
        kept = _rss_kb()
    assert kept - _rss_kb() > BIG * 4 // 1024 // 2  # malloc_trim returned (most of) the freed block


@glibc_only
@pytest.mark.parametrize("in_a_request", [False, True])
def test_free_holes_go_back_to_the_system_when_asked(in_a_request):
    """Blocks below the mmap threshold freed under a live one stay resident (glibc only trims the heap's top),
    inside a request too (which never trims by itself until it ends), until `give_back_free_memory`."""
    scope = cpu_allocator.reuse_freed_memory() if in_a_request else contextlib.nullcontext()
    with scope:
        small = [torch.ones(8192) for _ in range(6000)]  # 32 KB each, ~190 MB from the heap
        keeper = torch.ones(8192)  # above them: they are holes, not the heap's top, once freed
        del small
        held = _rss_kb()
        cpu_allocator.give_back_free_memory()
        assert held - _rss_kb() > 100_000  # KB: most of the ~190 MB of holes
        del keeper


def test_nested_and_concurrent_scopes_share_one_count():
    entered, leave = threading.Event(), threading.Event()

    def other_request() -> None:
        with cpu_allocator.reuse_freed_memory():
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=other_request)
    with cpu_allocator.reuse_freed_memory():
        thread.start()
        entered.wait(10)
        with cpu_allocator.reuse_freed_memory():
            pass
    assert cpu_allocator.active() == (cpu_allocator._LIBC is not None)  # the other request is still inside
    leave.set()
    thread.join(10)
    assert not cpu_allocator.active()
