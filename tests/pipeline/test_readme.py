"""The README's snippets run as written: each code block is taken from README.md itself and run unmodified.

Each runs from a copy of the layout it names (the repository root, with `examples/` and `../shared/`
beside it) against a real server on loopback: the library snippet on the tiny checkpoint, the fal
snippets with a fake generator (the protocol is what they show, not the model).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.service import (
    fake_factory,
    js_client_dir,
    make_settings,
    make_tls,
    running_server,
)

from tooncrafter.fixtures import DEFAULT_FIXTURES
from tooncrafter.service.app import create_app

ROOT = Path(__file__).resolve().parents[2]


def snippets(section: str, language: str) -> list[str]:
    """The code blocks of one language in the README section titled `section`."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no section {section!r}"
    return re.findall(rf"^```{language}\n(.*?)^```", match.group(1), flags=re.M | re.S)


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """`repo/` with examples/ and `../shared/reference/tiny_a`, as the snippets expect."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "shared" / "reference").mkdir(parents=True)
    (tmp_path / "shared" / "reference" / "tiny_a").symlink_to(DEFAULT_FIXTURES.resolve())
    return repo


def test_library_snippet(repo_copy: Path) -> None:
    (code,) = snippets("Use it from Python", "python")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_copy, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 5/5" in proc.stdout and (repo_copy / "clip.mp4").stat().st_size > 0


def test_fal_client_python_snippet(repo_copy: Path, tmp_path: Path) -> None:
    (setup,) = snippets("Use it from the fal clients", "bash")
    assert "pip install fal-client trustme" in setup and "FAL_QUEUE_RUN_HOST=127.0.0.1:8443/queue" in setup
    (code,) = snippets("Use it from the fal clients", "python")
    tls = make_tls(tmp_path)
    with running_server(create_app(make_settings(tmp_path), generator_factory=fake_factory()), tls=tls) as server:
        hostport = f"127.0.0.1:{server.port}"
        env = {**os.environ, "FAL_KEY": "k1", "FAL_RUN_HOST": hostport, "FAL_QUEUE_RUN_HOST": f"{hostport}/queue",
               "SSL_CERT_FILE": str(tls.ca_pem)}
        proc = subprocess.run([sys.executable, "-c", code], cwd=repo_copy, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 5/5" in proc.stdout and proc.stdout.strip().splitlines()[-1].startswith(server.base_url + "/files/")


def test_fal_client_javascript_snippet(repo_copy: Path, tmp_path: Path) -> None:
    js_dir = js_client_dir()
    (code,) = snippets("Use it from the fal clients", "js")
    script = js_dir / f"readme-snippet-{os.getpid()}.mjs"  # beside node_modules, so the import resolves
    script.write_text(code)
    try:
        with running_server(create_app(make_settings(tmp_path), generator_factory=fake_factory())) as server:
            env = {**os.environ, "TOONCRAFTER_URL": server.base_url}
            proc = subprocess.run(["node", str(script)], cwd=repo_copy, env=env, capture_output=True, text=True, timeout=120)
    finally:
        script.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    steps = [line for line in lines if re.fullmatch(r"step \d+/5", line)]
    assert steps == [f"step {i}/5" for i in range(1, 6)]  # each log line once, in order
    assert lines[-1].startswith(server.base_url + "/files/")
