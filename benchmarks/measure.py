"""Process measurements shared by both benchmark workers (ours and the official code's).

Standard library only: the official worker runs in the official code's own virtual environment, which
does not have our package. RSS comes from /proc/self/status (`VmRSS` now, `VmHWM` the peak), and the peak
can be reset (`clear_refs` "5") so that the load and the request get separate peaks.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from typing import Callable, Iterator


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): robust to other load on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def kernel_work() -> tuple[float, int]:
    """System CPU seconds and minor page faults of this process so far: what first touches of fresh memory cost
    (on a VM, a page the host has not backed yet costs ~10x one it has: benchmarks/README.md)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


def rss_mb() -> dict[str, float]:
    """Current (`VmRSS`) and peak (`VmHWM`) resident memory of this process in MB (MiB)."""
    found = {"VmRSS": 0.0, "VmHWM": 0.0}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in found:
                found[key] = int(value.split()[0]) / 1024
    return {"rss_mb": round(found["VmRSS"], 1), "peak_rss_mb": round(found["VmHWM"], 1)}


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StageClock:
    """Wall and CPU seconds of named stages, recorded by wrapping callables (the wrapped code is unchanged).

    `events` keeps every call in order as `(label, wall_s, cpu_s, system_s, minor_faults)`, so repeated stages
    (each DDIM step, each decode) stay separate.
    """

    def __init__(self, sync: Callable[[], None] = lambda: None) -> None:
        self.events: list[tuple[str, float, float, float, int]] = []
        self._sync = sync
        self._undo: list[tuple[object, str, object, bool]] = []

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)
        had_own = name in vars(owner)
        record = self._record

        def timed(*args, **kwargs):
            with record(label):
                return original(*args, **kwargs)

        setattr(owner, name, timed)
        self._undo.append((owner, name, original, had_own))

    def restore(self) -> None:
        for owner, name, original, had_own in reversed(self._undo):
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._undo.clear()

    @contextmanager
    def stage(self, label: str) -> Iterator[None]:
        with self._record(label):
            yield

    @contextmanager
    def _record(self, label: str) -> Iterator[None]:
        self._sync()
        start, cpu, (system, faults) = time.perf_counter(), cpu_seconds(), kernel_work()
        yield
        self._sync()
        system_end, faults_end = kernel_work()
        self.events.append((label, time.perf_counter() - start, cpu_seconds() - cpu, system_end - system, faults_end - faults))

    def summary(self) -> dict:
        """Per label: the total and, for repeated labels, every call (`<label>_each_s`)."""
        out: dict = {}
        for label, wall, cpu, system, faults in self.events:
            out[f"{label}_s"] = out.get(f"{label}_s", 0.0) + wall
            out[f"{label}_cpu_s"] = out.get(f"{label}_cpu_s", 0.0) + cpu
            out.setdefault(f"{label}_each_s", []).append(wall)
            out.setdefault(f"{label}_each_cpu_s", []).append(cpu)
            out.setdefault(f"{label}_each_system_s", []).append(system)
            out.setdefault(f"{label}_each_minor_faults", []).append(faults)
        return out
