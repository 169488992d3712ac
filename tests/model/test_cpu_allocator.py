"""Inside a request large CPU tensors reuse freed heap memory; after it, the memory goes back to the system."""

from __future__ import annotations

import resource
import threading

import pytest
import torch

from tooncrafter import cpu_allocator

glibc_only = pytest.mark.skipif(cpu_allocator._LIBC is None, reason="mallopt/malloc_trim are glibc")
BIG = 32 * 2**20  # floats: 128 MB, far above glibc's largest mmap threshold


def _faults_of_fresh_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(BIG)  # allocated, every page written, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


@glibc_only
def test_freed_blocks_are_reused_inside_and_faulted_again_outside():
    pages = BIG * 4 // 4096
    _faults_of_fresh_tensor()
    assert _faults_of_fresh_tensor() > pages // 2  # default glibc: a fresh mapping, zeroed page by page
    with cpu_allocator.reuse_freed_memory():
        assert cpu_allocator.active()
        _faults_of_fresh_tensor()  # the first ones may still grow the heap (or fill holes left by earlier tests)
        _faults_of_fresh_tensor()
        assert min(_faults_of_fresh_tensor() for _ in range(3)) < pages // 10  # then freed blocks are reused
    assert not cpu_allocator.active()
    _faults_of_fresh_tensor()
    assert _faults_of_fresh_tensor() > pages // 2  # settings restored


@glibc_only
def test_memory_is_handed_back_when_the_last_request_leaves():
    with cpu_allocator.reuse_freed_memory():
        torch.ones(BIG)
        kept = _rss_kb()
    assert kept - _rss_kb() > BIG * 4 // 1024 // 2  # malloc_trim returned (most of) the freed block


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
