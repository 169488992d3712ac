"""The benchmark's stage clock: what it records per stage, beside the timings (which these tests do not judge)."""

from __future__ import annotations

import mmap

from benchmarks.measure import StageClock

PAGE = mmap.PAGESIZE


def test_each_stage_records_the_fresh_pages_it_touched():
    clock = StageClock()
    size = 32 << 20
    with clock.stage("touch"):
        memory = mmap.mmap(-1, size)  # anonymous: no page is backed until written
        for offset in range(0, size, PAGE):
            memory[offset] = 1
    with clock.stage("idle"):
        pass
    memory.close()
    summary = clock.summary()
    touched, idle = summary["touch_each_minor_faults"], summary["idle_each_minor_faults"]
    # every written page faulted once (the kernel may map a few at a time, never none)
    assert touched[0] >= size // PAGE // 16 and idle[0] < touched[0] // 100
    assert len(summary["touch_each_system_s"]) == len(summary["idle_each_system_s"]) == 1
    assert [label for label, *_ in clock.events] == ["touch", "idle"]


def test_wrapped_calls_are_recorded_in_order_and_restored():
    class Worker:
        def run(self, n: int) -> int:
            return n * 2

    worker, clock = Worker(), StageClock()
    clock.wrap(worker, "run", "step")
    assert [worker.run(1), worker.run(2)] == [2, 4]
    clock.restore()
    assert "run" not in vars(worker)
    summary = clock.summary()
    assert len(summary["step_each_s"]) == len(summary["step_each_minor_faults"]) == 2
