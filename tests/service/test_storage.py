"""LocalFileStorage: round trips, immutability, and keys that try to leave the root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tooncrafter.service.storage import storage_from_url
from tooncrafter.service.storage.base import (
    InvalidKeyError,
    Storage,
    StorageError,
    StoredFile,
    is_valid_key,
    public_file_url,
    safe_file_name,
)
from tooncrafter.service.storage.local import LocalFileStorage


@pytest.fixture
def storage(tmp_path: Path) -> LocalFileStorage:
    return LocalFileStorage(tmp_path / "files")


def test_put_read_stat_delete_round_trip(storage: LocalFileStorage) -> None:
    stored = storage.put(b"hello world", content_type="text/plain", file_name="greeting.txt")
    assert isinstance(storage, Storage)
    assert stored == StoredFile(key=stored.key, size=11, content_type="text/plain", file_name="greeting.txt")
    token, name = stored.key.split("/")
    assert name == "greeting.txt" and len(token) >= 22 and is_valid_key(stored.key)

    assert storage.exists(stored.key)
    assert storage.read(stored.key) == b"hello world"
    assert storage.stat(stored.key) == stored
    assert storage.open_range(stored.key, 6, 10) == b"world"
    assert b"".join(storage.iter_range(stored.key, 0, 10, chunk_size=3)) == b"hello world"

    storage.delete(stored.key)
    assert not storage.exists(stored.key)
    assert storage.stat(stored.key) is None
    with pytest.raises(FileNotFoundError):
        storage.read(stored.key)
    storage.delete(stored.key)  # idempotent


def test_keys_are_unique_and_unguessable(storage: LocalFileStorage) -> None:
    keys = {storage.put(b"x", content_type="image/png", file_name="a.png").key for _ in range(20)}
    assert len(keys) == 20
    assert len({k.split("/")[0] for k in keys}) == 20


def test_put_with_reserved_key_and_no_overwrite(storage: LocalFileStorage) -> None:
    key = storage.new_key("clip.mp4")
    assert not storage.exists(key)
    stored = storage.put(b"video", content_type="video/mp4", file_name="ignored.mp4", key=key)
    assert stored.key == key and stored.file_name == "clip.mp4"
    with pytest.raises(StorageError):
        storage.put(b"other", content_type="video/mp4", file_name="clip.mp4", key=key)
    assert storage.read(key) == b"video"


def test_same_token_with_other_name_is_not_found(storage: LocalFileStorage) -> None:
    stored = storage.put(b"data", content_type="image/png", file_name="a.png")
    token = stored.key.split("/")[0]
    assert storage.stat(f"{token}/b.png") is None
    with pytest.raises(FileNotFoundError):
        storage.read(f"{token}/b.png")


@pytest.mark.parametrize(
    "key",
    [
        "../secret",
        "..",
        "/etc/passwd",
        "aaaaaaaaaaaaaaaaaaaaaaaa/../../etc/passwd",
        "aaaaaaaaaaaaaaaaaaaaaaaa/..",
        "aaaaaaaaaaaaaaaaaaaaaaaa/.hidden",
        "..%2f..%2fetc/passwd",
        "aaaaaaaaaaaaaaaaaaaaaaaa\\..\\x",
        "aaaaaaaaaaaaaaaaaaaaaaaa/x/y",
        "short/x.png",
        "",
        "aaaaaaaaaaaaaaaaaaaaaaaa/x.png\x00",
        "aaaaaaaaaaaaaaaaaaaaaaaa/x.png\n",
    ],
)
def test_traversal_and_malformed_keys_are_refused(storage: LocalFileStorage, tmp_path: Path, key: str) -> None:
    (tmp_path / "secret").write_bytes(b"do not read")
    assert not is_valid_key(key)
    assert storage.stat(key) is None
    assert not storage.exists(key)
    with pytest.raises(InvalidKeyError):
        storage.read(key)
    with pytest.raises(InvalidKeyError):
        storage.put(b"x", content_type="text/plain", file_name="x", key=key)
    assert (tmp_path / "secret").read_bytes() == b"do not read"


def test_file_names_and_content_types_are_sanitised(storage: LocalFileStorage) -> None:
    stored = storage.put(b"x", content_type="text/html\r\nSet-Cookie: a=b", file_name="../../évil name?.png")
    assert stored.file_name == "evil_name_.png"
    assert stored.content_type == "application/octet-stream"
    assert is_valid_key(stored.key)
    assert safe_file_name("") == "file"
    assert safe_file_name("...") == "file"
    assert safe_file_name("C:\\Users\\me\\frame.jpg") == "frame.jpg"
    long = safe_file_name("a" * 300 + ".png")
    assert len(long) == 100 and long.endswith(".png")


def test_metadata_sidecar_is_json(storage: LocalFileStorage) -> None:
    stored = storage.put(b"abc", content_type="image/png; charset=binary", file_name="k.png")
    meta = json.loads((storage.root / stored.key.split("/")[0] / "meta.json").read_text())
    assert meta == {"key": stored.key, "size": 3, "content_type": "image/png; charset=binary", "file_name": "k.png"}
    # A fresh instance over the same directory sees the same file (survives restarts).
    assert LocalFileStorage(storage.root).read(stored.key) == b"abc"


def test_storage_from_url(tmp_path: Path) -> None:
    storage = storage_from_url(f"file://{tmp_path}/store")
    assert isinstance(storage, LocalFileStorage) and storage.root == (tmp_path / "store").resolve()
    from tooncrafter.service.storage.s3 import S3Storage

    assert isinstance(storage_from_url("s3://bucket/prefix"), S3Storage)
    with pytest.raises(StorageError):
        storage_from_url("file://relative/path")
    with pytest.raises(StorageError):
        storage_from_url("ftp://host/dir")


def test_public_file_url() -> None:
    assert public_file_url("http://h:8000/", "tok/a.png") == "http://h:8000/files/tok/a.png"
    assert public_file_url("https://x.example/api", "tok/a.png") == "https://x.example/api/files/tok/a.png"


def test_every_backend_mints_keys_the_same_way(storage: LocalFileStorage) -> None:
    from tooncrafter.service.storage.base import key_file_name
    from tooncrafter.service.storage.s3 import S3Storage

    s3 = S3Storage("bucket", "prefix", client=object())  # new_key never touches the client
    for backend in (storage, s3):
        key = backend.new_key("../Ünïcode clip.mp4")
        assert is_valid_key(key) and key_file_name(key) == "Unicode_clip.mp4"


def test_only_uploads_get_the_upload_prefix(storage: LocalFileStorage, monkeypatch) -> None:
    """A random token that happens to start like an upload's is drawn again: uploads expire on their
    own clock, and an output must never look like one."""
    from tooncrafter.service.storage import base

    draws = iter(["upload-" + "a" * 17, "b" * 24, "upload-" + "c" * 17])
    monkeypatch.setattr(base.secrets, "token_urlsafe", lambda _n: next(draws))
    assert storage.new_key("clip.mp4") == "b" * 24 + "/clip.mp4"
    assert storage.new_key("a.png", prefix=base.UPLOAD_KEY_PREFIX) == "upload-upload-" + "c" * 17 + "/a.png"  # kept: prefixed


@pytest.mark.parametrize("prefix", ["", "../", "upload/", "a" * 33])
def test_purge_needs_a_token_prefix(storage: LocalFileStorage, prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        storage.purge(prefix, older_than=float("inf"))
