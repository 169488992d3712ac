"""The processes we start turn glibc's tcache off, and with it off large freed tensors are reused (glibc_tunables.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tooncrafter.glibc_tunables import TCACHE_OFF, TUNABLES_ENV, on_glibc, tunables_for

needs_glibc = pytest.mark.skipif(not on_glibc(), reason="GLIBC_TUNABLES is read by glibc only")


def test_tunables_are_added_to_what_the_environment_has():
    assert tunables_for({}, glibc=True) == TCACHE_OFF
    assert tunables_for({TUNABLES_ENV: "glibc.malloc.arena_max=2"}, glibc=True) == f"glibc.malloc.arena_max=2:{TCACHE_OFF}"
    assert tunables_for({TUNABLES_ENV: "  "}, glibc=True) == TCACHE_OFF


def test_a_tcache_setting_of_the_user_and_other_c_libraries_are_left_alone():
    assert tunables_for({TUNABLES_ENV: "glibc.malloc.tcache_count=7"}, glibc=True) is None
    assert tunables_for({TUNABLES_ENV: "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=3"}, glibc=True) is None
    assert tunables_for({}, glibc=False) is None


def _run(code: str, environ: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != TUNABLES_ENV} | environ
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@needs_glibc
def test_a_process_restarts_once_with_the_tcache_off_and_keeps_its_arguments():
    code = """
        import os, sys
        from tooncrafter.glibc_tunables import restart_with_allocator_tunables
        restart_with_allocator_tunables()
        print(os.getpid(), os.environ["GLIBC_TUNABLES"], sys.argv[1:])
    """
    env = {k: v for k, v in os.environ.items() if k != TUNABLES_ENV}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), "a b", "c"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1  # the first process was replaced before it printed: the command ran once
    pid, tunables, args = lines[0].split(" ", 2)
    assert int(pid) != os.getpid() and tunables == TCACHE_OFF and args == "['a b', 'c']"


@needs_glibc
def test_with_the_tcache_off_freed_tensors_of_one_size_are_reused():
    # two 32 MiB tensors alive at a time, 12 rounds, large blocks on the heap as during a request
    code = """
        import ctypes, torch
        from tooncrafter.glibc_tunables import restart_with_allocator_tunables
        from tooncrafter.cpu_allocator import reuse_freed_memory
        restart_with_allocator_tunables()

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        block = 2**23 * 4
        with reuse_freed_memory():
            start = libc.mallinfo2().arena
            x = torch.ones(block // 4)
            for _ in range(12):
                y = x * 2
                x = y + 1
                small = torch.ones(100)
            print((libc.mallinfo2().arena - start) / block)
    """
    grown_blocks = float(_run(code, {}))
    assert grown_blocks < 6, grown_blocks  # 4 here; with the tcache on (glibc 2.36) 7, one per poisoned hole


@needs_glibc
def test_the_tooncrafter_command_starts_with_the_tcache_off():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "tooncrafter"]
    assert script.value == "tooncrafter.cli:run"
    code = """
        import os, sys
        from tooncrafter import cli
        cli.main = lambda: print("main", os.environ.get("GLIBC_TUNABLES")) or 0
        sys.exit(cli.run())
    """
    assert _run(code, {}).splitlines() == [f"main {TCACHE_OFF}"]
