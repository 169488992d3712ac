"""Where uploaded inputs and generated videos live, behind one small interface.

A stored file is named by a key `"{token}/{name}"`: `token` is `secrets.token_urlsafe` output (the
unguessable part: knowing a key is the permission to read it, as with fal's CDN URLs) and `name`
is a sanitised copy of the client's file name, kept so downloads get a sensible name. Files are
immutable: a key is written once and never overwritten.

Backends are chosen by URL (`storage_from_url`): `file:///abs/dir` for one machine (or a shared
file system), `s3://bucket/prefix` for scale-out (`s3_storage.S3Storage`, same methods, keys
mapping to object names `prefix/token/name`).

Local layout: `root/{token}/data` holds the bytes and `root/{token}/meta.json` the content type,
file name and size. The name part of a key never touches the file system, and keys are checked
against a strict pattern before any path is built, so no key can reach outside `root`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

DEFAULT_CONTENT_TYPE = "application/octet-stream"
DEFAULT_FILE_NAME = "file"
MAX_FILE_NAME_CHARS = 100
READ_CHUNK_BYTES = 256 * 1024

_TOKEN_BYTES = 18  # token_urlsafe(18) -> 24 characters, 144 random bits
_TOKEN_PATTERN = r"[A-Za-z0-9_-]{16,64}"
# The name may contain dots but must not start with one, so it can never be "." or "..".
_NAME_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,%d}" % (MAX_FILE_NAME_CHARS - 1)
_KEY_RE = re.compile(rf"(?P<token>{_TOKEN_PATTERN})/(?P<name>{_NAME_PATTERN})")  # used with fullmatch
# type/subtype plus optional parameters; no control characters, so it is safe in a header.
_CONTENT_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*( *;[\x20-\x7e]*)?$")


class StorageError(Exception):
    """A storage backend could not be configured or used."""


class StorageNotImplementedError(StorageError, NotImplementedError):
    """The storage URL names a backend this version does not have (kept for callers that catch it)."""


class InvalidKeyError(StorageError, KeyError):
    """A key that this storage could never have issued (wrong shape, traversal attempt)."""


@dataclass(frozen=True)
class StoredFile:
    """What the storage knows about one stored file."""

    key: str
    size: int
    content_type: str
    file_name: str


@runtime_checkable
class Storage(Protocol):
    """The operations the service needs from a file store; keys come from `new_key` or `put`."""

    def new_key(self, file_name: str) -> str:
        """Reserve nothing, just mint a fresh unguessable key for `file_name` (for upload URLs)."""
        ...

    def put(
        self, data: bytes, *, content_type: str, file_name: str, key: str | None = None
    ) -> StoredFile:
        """Store `data` under `key` (a fresh key when None); an existing key is never overwritten."""
        ...

    def read(self, key: str) -> bytes: ...

    def open_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes `start..end` inclusive (HTTP Range semantics); for small reads only."""
        ...

    def iter_range(
        self, key: str, start: int, end: int, chunk_size: int = READ_CHUNK_BYTES
    ) -> Iterator[bytes]:
        """Bytes `start..end` inclusive in chunks, without holding the whole range in memory."""
        ...

    def stat(self, key: str) -> StoredFile | None: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...


def is_valid_key(key: str) -> bool:
    """True when `key` has the shape this module issues (checked before any path is built)."""
    return isinstance(key, str) and _KEY_RE.fullmatch(key) is not None


def new_key(file_name: str) -> str:
    """A fresh unguessable key `"{token}/{safe name}"`; every backend mints its keys here."""
    return f"{secrets.token_urlsafe(_TOKEN_BYTES)}/{safe_file_name(file_name)}"


def key_file_name(key: str) -> str:
    """The file-name part of a valid key (what downloads are named)."""
    return key.split("/", 1)[1]


def safe_file_name(file_name: str | None, default: str = DEFAULT_FILE_NAME) -> str:
    """A file name made only of `[A-Za-z0-9._-]`, not starting with a dot, at most 100 chars.

    Directory parts are dropped (`../../x.png` -> `x.png`), accents folded to ASCII, other
    characters replaced by `_`; the extension is kept when the name has to be shortened.
    """
    name = (file_name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._")
    if not name:
        return default
    if len(name) > MAX_FILE_NAME_CHARS:
        stem, dot, ext = name.rpartition(".")
        if dot and 0 < len(ext) <= 16:
            name = stem[: MAX_FILE_NAME_CHARS - len(ext) - 1] + "." + ext
        else:
            name = name[:MAX_FILE_NAME_CHARS]
    return name


def normalize_content_type(content_type: str | None) -> str:
    """`content_type` when it is a well-formed MIME type (safe to echo in a header), else octet-stream."""
    value = (content_type or "").strip()
    if not value or len(value) > 200 or _CONTENT_TYPE_RE.fullmatch(value) is None:
        return DEFAULT_CONTENT_TYPE
    return value


def public_file_url(base_url: str, key: str) -> str:
    """The URL clients download `key` from: `{base_url}/files/{key}` (base without trailing slash)."""
    return f"{base_url.rstrip('/')}/files/{key}"


class LocalFileStorage:
    """Files on a local (or shared, e.g. NFS) directory; see the module docstring for the layout."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalFileStorage({str(self.root)!r})"

    # -- keys and paths ------------------------------------------------------------------------

    def new_key(self, file_name: str) -> str:
        return new_key(file_name)

    def _dir(self, key: str) -> Path:
        """The directory of `key`; raises `InvalidKeyError` for anything this class did not issue."""
        match = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise InvalidKeyError(f"invalid storage key {key!r}")
        return self.root / match["token"]

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
            raise StorageError(f"storage key {key!r} already exists") from None
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

    def local_path(self, key: str) -> Path | None:
        """The file holding `key`'s bytes, for callers that can use a path directly."""
        return self._dir(key) / "data" if self.exists(key) else None

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


def storage_from_url(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> Storage:
    """The storage a `STORAGE_URL` names: `file:///abs/path` (or a plain absolute path), or
    `s3://bucket/prefix` (optionally `?endpoint_url=http://minio:9000&region=...`, which is how
    `Settings.resolved_storage_url` passes `S3_ENDPOINT_URL`/`S3_REGION` along; the keyword
    arguments win over the query).
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"file storage URL must be file:///absolute/path, got {url!r}")
        path = unquote(parsed.path)
        if not path.startswith("/"):
            raise StorageError(f"file storage URL must hold an absolute path, got {url!r}")
        return LocalFileStorage(Path(path))
    if parsed.scheme == "" and url.startswith("/"):
        return LocalFileStorage(Path(url))
    if parsed.scheme == "s3":
        from urllib.parse import parse_qs

        from tooncrafter.service.s3_storage import S3Storage

        query = {name: values[-1] for name, values in parse_qs(parsed.query).items()}
        unknown = set(query) - {"endpoint_url", "region"}
        if unknown:
            raise StorageError(f"unknown option(s) {sorted(unknown)} in storage URL {url!r}")
        return S3Storage(
            parsed.netloc,
            unquote(parsed.path),
            endpoint_url=endpoint_url or query.get("endpoint_url"),
            region=region or query.get("region"),
        )
    raise StorageError(f"unsupported storage URL {url!r}: expected file:///absolute/path or s3://bucket/prefix")
