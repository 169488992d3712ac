"""Keep freed CPU memory in the process while a request runs, instead of zeroing fresh pages for every tensor.

glibc serves every allocation above its mmap threshold (at most 32 MB, and most activations of a UNet step or
a decode are larger) with a new `mmap` and unmaps it on free, so each large tensor costs the kernel a page
fault per 4 KB page and zeroing of the whole block: ~800k faults and 2-2.5 s of system time per UNet call at
`mid`, 2.3M faults and 4.5 s per decode (measured with `getrusage`). With `mmap` turned off and no trimming
for the duration of a request, the heap reuses freed blocks (decode system time 4.5 -> 0.5 s); when the last
request ends, `malloc_trim` hands the free memory back so an idle process stays small.

Limits: freed blocks are reused when the next request fits in them, not always (the heap fragments; with glibc's
tcache on, a freed tensor's block is too short for the next tensor of its size: glibc_tunables.py, which our
processes start with); and a thread that glibc has moved off the main arena (worker threads under contention)
still gets its own mapping for blocks over its heap size (64 MB), because glibc falls back to mmap there
whatever M_MMAP_MAX says.

A no-op where there is no glibc (other C libraries, other systems). Process-wide, so nested and concurrent
requests share one count and the settings are restored only when the last one leaves.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from typing import Iterator

from tooncrafter.model.mapped_pages import linux_libc

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h) and glibc's defaults for them
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
NO_TRIM = 2**31 - 1  # the largest value mallopt takes: in effect, never trim during a request

_lock = threading.Lock()
_active = 0


def _glibc() -> ctypes.CDLL | None:
    libc = linux_libc()
    if libc is None:
        return None
    try:
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc if hasattr(libc, "gnu_get_libc_version") else None
    except AttributeError:  # a C library other than glibc
        return None


_LIBC = _glibc()


def _mallopt(param: int, value: int) -> None:
    if _LIBC is not None and _LIBC.mallopt(param, value) != 1:
        logger.debug("mallopt(%d, %d) was refused", param, value)


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """For the duration of the block, large CPU allocations come from (and return to) the heap."""
    global _active
    if _LIBC is None:
        yield
        return
    with _lock:
        _active += 1
        if _active == 1:
            _mallopt(M_MMAP_MAX, 0)
            _mallopt(M_TRIM_THRESHOLD, NO_TRIM)
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                _mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                _mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                give_back_free_memory()


def give_back_free_memory() -> None:
    """Hand the heap's free pages back to the system now (`malloc_trim`): at the end of a load, whose converted or
    packed weights leave their source copies as free holes between the kept ones (glibc only trims the heap's top:
    mid bf16 4.9 -> 4.2 GB after load), and between the phases of a request, when the next phase needs larger
    blocks than the freed ones (a page given back and reused later costs one fresh fault)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def active() -> bool:
    """Whether a request is inside `reuse_freed_memory` now (for tests and logs)."""
    return _active > 0
