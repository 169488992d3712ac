"""Stored files in a local (or shared, e.g. NFS) directory.

Layout: `root/{token}/data` holds the bytes and `root/{token}/meta.json` the content type, file
name and size. The name part of a key never touches the file system, and keys are checked against
a strict pattern (`base.key_token`) before any path is built, so no key can reach outside `root`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from tooncrafter.service.storage.base import (
    READ_CHUNK_BYTES,
    KeyExistsError,
    StoredFile,
    check_token_prefix,
    is_valid_key,
    key_file_name,
    key_token,
    new_key,
    normalize_content_type,
)


class LocalFileStorage:
    """Files under `root`; see the module docstring for the layout."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalFileStorage({str(self.root)!r})"

    # -- keys and paths ------------------------------------------------------------------------

    def new_key(self, file_name: str, *, prefix: str = "") -> str:
        return new_key(file_name, prefix=prefix)

    def _dir(self, key: str) -> Path:
        """The directory of `key`; raises `InvalidKeyError` for anything this class did not issue."""
        return self.root / key_token(key)

    def _meta(self, key: str) -> dict | None:
        try:
            meta = json.loads((self._dir(key) / "meta.json").read_text("utf-8"))
        except (OSError, ValueError):  # missing, unreadable or half-written: not a stored file
            return None
        # The token directory belongs to exactly one key: a different name is a different file.
        return meta if meta.get("key") == key else None

    # -- Storage -------------------------------------------------------------------------------

    def put(
        self, data: bytes, *, content_type: str, file_name: str, key: str | None = None
    ) -> StoredFile:
        if key is None:
            key = self.new_key(file_name)
        directory = self._dir(key)
        stored = StoredFile(
            key=key,
            size=len(data),
            content_type=normalize_content_type(content_type),
            file_name=key_file_name(key),
        )
        try:
            directory.mkdir()  # fails if the key (token) was already used: no overwrites
        except FileExistsError:
            raise KeyExistsError(f"storage key {key!r} already exists") from None
        # Data first, metadata last: a file "exists" only once its meta.json is in place.
        self._write_atomic(directory / "data", data)
        self._write_atomic(directory / "meta.json", json.dumps(asdict(stored)).encode("utf-8"))
        return stored

    def read(self, key: str) -> bytes:
        self._require(key)
        return (self._dir(key) / "data").read_bytes()

    def open_range(self, key: str, start: int, end: int) -> bytes:
        return b"".join(self.iter_range(key, start, end))

    def iter_range(
        self, key: str, start: int, end: int, chunk_size: int = READ_CHUNK_BYTES
    ) -> Iterator[bytes]:
        self._require(key)
        if start < 0 or end < start - 1:
            raise ValueError(f"invalid byte range {start}-{end}")
        path = self._dir(key) / "data"

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                f.seek(start)
                remaining = end - start + 1
                while remaining > 0:
                    chunk = f.read(min(chunk_size, remaining))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                    yield chunk

        return chunks()

    def stat(self, key: str) -> StoredFile | None:
        if not is_valid_key(key):
            return None
        meta = self._meta(key)
        if meta is None:
            return None
        return StoredFile(
            key=key, size=int(meta["size"]), content_type=meta["content_type"], file_name=meta["file_name"]
        )

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error (deletes are idempotent)."""
        if self._meta(key) is None:
            return
        directory = self._dir(key)
        (directory / "meta.json").unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def purge(self, prefix: str, older_than: float) -> int:
        """See `Storage.purge`. A file was stored when its token directory last changed (its data and
        meta.json are renamed into it), so a half-written one ages from its last write too."""
        check_token_prefix(prefix)
        deleted = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    stored_at = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:  # deleted meanwhile
                    continue
                if stored_at < older_than:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    deleted += 1
        return deleted

    # -- helpers -------------------------------------------------------------------------------

    def _require(self, key: str) -> None:
        if self._meta(key) is None:
            raise FileNotFoundError(f"no stored file {key!r}")

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
