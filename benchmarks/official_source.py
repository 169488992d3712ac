"""Where the official ToonCrafter code comes from for a side-by-side run: its source tree and its Python.

`--official-src` is a work tree of Doubiiu/ToonCrafter (has `lvdm/`) or a git directory (e.g. a bare mirror);
a git directory is extracted once with `git archive` under the benchmark cache. The official code runs in its
own virtual environment (`--official-python`; see benchmarks/README.md, "Side by side with the official code"),
because it pins an older open_clip and needs none of our dependencies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

OFFICIAL_PYTHON_ENV = "TOONCRAFTER_OFFICIAL_PYTHON"


@dataclass(frozen=True)
class OfficialSource:
    tree: Path
    commit: str | None
    python: str


def _commit_of(git_args: list[str], rev: str) -> str | None:
    try:
        return subprocess.run(["git", *git_args, "rev-parse", f"{rev}^{{commit}}"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def resolve_official_source(src: str, python: str | None, cache_dir: Path, rev: str = "HEAD") -> OfficialSource:
    """The official tree (extracted from a git dir when needed) and the interpreter that runs it."""
    path = Path(src)
    if (path / "lvdm").is_dir():
        tree, commit = path, _commit_of(["-C", str(path)], rev)
    else:
        commit = _commit_of(["--git-dir", str(path)], rev)
        if commit is None:
            raise SystemExit(f"--official-src {src}: neither an official work tree (no lvdm/) nor a git directory")
        tree = cache_dir / f"official-{commit[:12]}"
        if not (tree / "lvdm").is_dir():
            cache_dir.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".extract-"))
            archive = subprocess.run(["git", "--git-dir", str(path), "archive", commit], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(partial)], input=archive.stdout, check=True)
            if tree.exists():
                shutil.rmtree(tree)
            partial.rename(tree)
    python = python or os.environ.get(OFFICIAL_PYTHON_ENV)
    if not python:
        raise SystemExit(
            f"--official-python (or ${OFFICIAL_PYTHON_ENV}) must name the Python of the official code's virtual "
            "environment (torch, open_clip_torch==2.22.0, kornia, omegaconf, einops); see benchmarks/README.md"
        )
    if not Path(python).is_file() and shutil.which(python) is None:
        raise SystemExit(f"--official-python {python}: no such interpreter")
    return OfficialSource(tree=tree, commit=commit, python=python)
