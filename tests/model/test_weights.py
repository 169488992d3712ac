"""weights.py: explicit files and directories, and the Hugging Face cache path for real (no network)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tooncrafter import weights
from tooncrafter.fixtures import fixtures_dir_from_env
from tooncrafter.weights import (
    ResolvedCheckpoint,
    WeightsNotFoundError,
    hub_cache_dir,
    resolve_checkpoint,
    resolve_open_clip_weights,
    resolve_sketch_checkpoint,
)

REFERENCE = fixtures_dir_from_env()  # only its file layout is used: model.ckpt + config.yaml
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch):
    """Any attempt to open a connection (or resolve a name) fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"test tried to use the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _lay_out_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT) -> Path:
    """Put files into a HF hub cache the way huggingface_hub does: blobs + snapshot symlinks + refs/main."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for index, (name, source) in enumerate(files.items()):
        blob = repo_dir / "blobs" / f"{index:064x}"
        blob.symlink_to(source.resolve())
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


# --------------------------------------------------------------------------------------------
# Explicit paths
# --------------------------------------------------------------------------------------------


def _require_reference() -> None:
    if not (REFERENCE / "model.ckpt").is_file() or (REFERENCE / "model.safetensors").is_file():
        pytest.skip(f"no reference model.ckpt (alone) at {REFERENCE}")


def test_explicit_checkpoint_file_uses_builtin_config():
    _require_reference()
    resolved = resolve_checkpoint(REFERENCE / "model.ckpt")
    assert resolved == ResolvedCheckpoint(
        weights_path=REFERENCE / "model.ckpt", config_path=None, directory=REFERENCE, source="file"
    )
    assert resolve_checkpoint(str(REFERENCE / "model.ckpt")).weights_path == REFERENCE / "model.ckpt"


def test_explicit_safetensors_file(tmp_path: Path):
    path = tmp_path / "tooncrafter_fp16.safetensors"
    path.write_bytes(b"\x00" * 8)
    resolved = resolve_checkpoint(path)
    assert resolved.weights_path == path and resolved.config_path is None and resolved.source == "file"


def test_file_with_unknown_suffix_is_refused(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("model: {}")
    with pytest.raises(WeightsNotFoundError, match="not a checkpoint file"):
        resolve_checkpoint(path)


def test_checkpoint_directory_with_config():
    _require_reference()
    resolved = resolve_checkpoint(REFERENCE)
    assert resolved.weights_path == REFERENCE / "model.ckpt"
    assert resolved.config_path is not None and resolved.config_path.parent == REFERENCE
    assert resolved.config_path.name in weights.DIRECTORY_CONFIG_NAMES
    assert resolved.directory == REFERENCE and resolved.source == "directory"


def test_directory_prefers_safetensors_and_config_is_optional(tmp_path: Path):
    (tmp_path / "model.ckpt").write_bytes(b"x")
    resolved = resolve_checkpoint(tmp_path)
    assert resolved.weights_path == tmp_path / "model.ckpt" and resolved.config_path is None
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "config.yaml").write_text("model: {}")
    resolved = resolve_checkpoint(tmp_path)
    assert resolved.weights_path == tmp_path / "model.safetensors"
    assert resolved.config_path == tmp_path / "config.yaml"


def test_directory_without_weights_is_an_error(tmp_path: Path):
    (tmp_path / "config.yaml").write_text("model: {}")
    with pytest.raises(WeightsNotFoundError, match="model.safetensors or model.ckpt"):
        resolve_checkpoint(tmp_path)


def test_missing_path_names_the_path_and_the_fix(tmp_path: Path):
    missing = tmp_path / "nowhere" / "model.ckpt"
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_checkpoint(missing)
    message = str(info.value)
    assert str(missing) in message and "--checkpoint" in message and "TOONCRAFTER_CHECKPOINT" in message
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------------------------
# Hugging Face cache
# --------------------------------------------------------------------------------------------


def test_hub_cache_dir_follows_the_environment_now(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"


def test_hub_default_resolves_from_offline_cache(offline_cache: Path):
    _require_reference()
    snapshot = _lay_out_hub_cache(offline_cache, "Doubiiu/ToonCrafter", {"model.ckpt": REFERENCE / "model.ckpt"})
    resolved = resolve_checkpoint(None)
    assert resolved.source == "hub"
    assert resolved.weights_path == snapshot / "model.ckpt"
    assert resolved.weights_path.resolve() == (REFERENCE / "model.ckpt").resolve()
    assert resolved.config_path is None  # the hub repo is the 512 model
    assert resolved.directory == snapshot


def test_hub_offline_and_not_cached_names_the_fix(offline_cache: Path):
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_checkpoint(None, progress=False)
    message = str(info.value)
    assert "--checkpoint" in message and "TOONCRAFTER_CHECKPOINT" in message
    assert "Doubiiu/ToonCrafter/model.ckpt" in message and "HF_HUB_OFFLINE" in message
    assert str(offline_cache) in message


def test_cached_copy_is_used_without_asking_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Not offline, but the autouse fixture refuses every connection: the cache must be enough."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    source = tmp_path / "weights.ckpt"
    source.write_bytes(b"weights")
    snapshot = _lay_out_hub_cache(tmp_path / "cache", "someone/model", {"model.ckpt": source})
    resolved = resolve_checkpoint(None, repo_id="someone/model", cache_dir=tmp_path / "cache")
    assert resolved.weights_path == snapshot / "model.ckpt"


def test_unreachable_hub_is_a_weights_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Online mode with no network: huggingface_hub's connection failure becomes our error."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights.hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(weights, "hf_hub_download", fake_download)
    with pytest.raises(WeightsNotFoundError, match="cannot be reached.*--checkpoint"):
        resolve_checkpoint(None, cache_dir=tmp_path, progress=False)
    assert [c["local_files_only"] for c in calls[:1]] == [True]  # cache first
    online = [c for c in calls if not c.get("local_files_only")]
    assert len(online) == 1 and online[0]["filename"] == "model.ckpt"
    # progress=False reaches the download as a bar that never draws, without a global switch
    bar = online[0]["tqdm_class"](total=10)
    assert bar.disable
    bar.close()


def test_progress_bar_left_to_huggingface_hub_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub.utils import LocalEntryNotFoundError

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(tmp_path / "model.ckpt")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights.hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(weights, "hf_hub_download", fake_download)
    assert resolve_checkpoint(None, cache_dir=tmp_path).weights_path == tmp_path / "model.ckpt"
    assert "tqdm_class" not in calls[-1]


def test_hub_resolution_in_a_fresh_process(tmp_path: Path):
    """The real-life path: huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE at import."""
    _require_reference()
    cache = tmp_path / "cache"
    snapshot = _lay_out_hub_cache(cache, "Doubiiu/ToonCrafter", {"model.ckpt": REFERENCE / "model.ckpt"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    code = "from tooncrafter.weights import resolve_checkpoint; print(resolve_checkpoint(None).weights_path)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(snapshot / "model.ckpt")
    empty = dict(env, HF_HUB_CACHE=str(tmp_path / "empty"))
    result = subprocess.run([sys.executable, "-c", code], env=empty, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "WeightsNotFoundError" in result.stderr and "--checkpoint" in result.stderr


# --------------------------------------------------------------------------------------------
# OpenCLIP release weights
# --------------------------------------------------------------------------------------------

OPEN_CLIP_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def test_open_clip_repo_comes_from_open_clip():
    from open_clip import pretrained

    assert pretrained.get_pretrained_cfg("ViT-H-14", "laion2b_s32b_b79k")["hf_hub"].rstrip("/") == OPEN_CLIP_REPO


def test_open_clip_weights_prefer_safetensors(offline_cache: Path, tmp_path: Path):
    safe, pickle = tmp_path / "a.safetensors", tmp_path / "b.bin"
    safe.write_bytes(b"s")
    pickle.write_bytes(b"p")
    snapshot = _lay_out_hub_cache(
        offline_cache, OPEN_CLIP_REPO, {"open_clip_model.safetensors": safe, "open_clip_pytorch_model.bin": pickle}
    )
    assert resolve_open_clip_weights() == snapshot / "open_clip_model.safetensors"


def test_open_clip_weights_fall_back_to_bin(offline_cache: Path, tmp_path: Path):
    pickle = tmp_path / "b.bin"
    pickle.write_bytes(b"p")
    snapshot = _lay_out_hub_cache(offline_cache, OPEN_CLIP_REPO, {"open_clip_pytorch_model.bin": pickle})
    assert resolve_open_clip_weights() == snapshot / "open_clip_pytorch_model.bin"


def test_open_clip_weights_offline_and_not_cached(offline_cache: Path):
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_open_clip_weights()
    message = str(info.value)
    assert OPEN_CLIP_REPO in message and "CLIP towers" in message and "--checkpoint" in message


def test_open_clip_unknown_release():
    with pytest.raises(WeightsNotFoundError, match="no Hugging Face hub release"):
        resolve_open_clip_weights("ViT-H-14", "no-such-release")


# --------------------------------------------------------------------------------------------
# Sketch encoder weights
# --------------------------------------------------------------------------------------------


def test_sketch_checkpoint_explicit_file_and_directory(tmp_path: Path):
    ckpt = tmp_path / "my_sketch.safetensors"
    ckpt.write_bytes(b"x")
    assert resolve_sketch_checkpoint(ckpt) == ckpt
    assert resolve_sketch_checkpoint(str(ckpt)) == ckpt
    (tmp_path / "sketch_encoder.ckpt").write_bytes(b"x")
    assert resolve_sketch_checkpoint(tmp_path) == tmp_path / "sketch_encoder.ckpt"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(WeightsNotFoundError, match="--sketch-checkpoint .*not a checkpoint file"):
        resolve_sketch_checkpoint(tmp_path / "notes.txt")


def test_sketch_checkpoint_missing_path_names_the_option(tmp_path: Path):
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_sketch_checkpoint(tmp_path / "nowhere.ckpt")
    message = str(info.value)
    assert "--sketch-checkpoint" in message and "TOONCRAFTER_SKETCH_CHECKPOINT" in message
    assert "--checkpoint " not in message.replace("--sketch-checkpoint", "")
    with pytest.raises(WeightsNotFoundError, match="directory without sketch_encoder.ckpt"):
        resolve_sketch_checkpoint(tmp_path)


def test_sketch_checkpoint_from_offline_hub_cache(offline_cache: Path, tmp_path: Path):
    source = tmp_path / "sketch.bin"
    source.write_bytes(b"sketch weights")
    snapshot = _lay_out_hub_cache(
        offline_cache, "Doubiiu/ToonCrafter", {"model.ckpt": source, weights.SKETCH_FILENAME: source}
    )
    assert weights.SKETCH_FILENAME == "sketch_encoder.ckpt"
    assert resolve_sketch_checkpoint(None) == snapshot / "sketch_encoder.ckpt"


def test_sketch_checkpoint_offline_and_not_cached_names_sketch_option(offline_cache: Path, tmp_path: Path):
    source = tmp_path / "model.bin"
    source.write_bytes(b"main weights only")
    _lay_out_hub_cache(offline_cache, "Doubiiu/ToonCrafter", {"model.ckpt": source})
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_sketch_checkpoint(None, progress=False)
    message = str(info.value)
    assert "Doubiiu/ToonCrafter/sketch_encoder.ckpt" in message and "HF_HUB_OFFLINE" in message
    assert "--sketch-checkpoint" in message and "TOONCRAFTER_SKETCH_CHECKPOINT" in message


def test_sketch_checkpoint_downloads_like_model_ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub.utils import LocalEntryNotFoundError

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(tmp_path / kwargs["filename"])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights.hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(weights, "hf_hub_download", fake_download)
    assert resolve_sketch_checkpoint(None, cache_dir=tmp_path) == tmp_path / "sketch_encoder.ckpt"
    assert [(c["repo_id"], c["filename"], bool(c.get("local_files_only"))) for c in calls] == [
        ("Doubiiu/ToonCrafter", "sketch_encoder.ckpt", True),
        ("Doubiiu/ToonCrafter", "sketch_encoder.ckpt", False),
    ]
