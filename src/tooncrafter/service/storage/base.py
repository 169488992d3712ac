"""What every file store offers (`Storage`) and the keys it names files by.

A stored file is named by a key `"{token}/{name}"`: `token` is `secrets.token_urlsafe` output (the
unguessable part: knowing a key is the permission to read it, as with fal's CDN URLs) and `name`
is a sanitised copy of the client's file name, kept so downloads get a sensible name. Files are
immutable: a key is written once and never overwritten.

Backends (`local.LocalFileStorage`, `s3.S3Storage`) mint and check their keys with the helpers
here, so a key is valid everywhere or nowhere; `storage_from_url` (in `__init__`) picks one.

Uploaded files and the parts of multipart uploads have tokens starting with `UPLOAD_KEY_PREFIX`
(no other key's token does), so that they can expire on their own clock (`Storage.purge`, run by
the workers' retention loop) while outputs live as long as their job.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

DEFAULT_CONTENT_TYPE = "application/octet-stream"
DEFAULT_FILE_NAME = "file"
MAX_FILE_NAME_CHARS = 100
READ_CHUNK_BYTES = 256 * 1024

_TOKEN_BYTES = 18  # token_urlsafe(18) -> 24 characters, 144 random bits
UPLOAD_KEY_PREFIX = "upload-"  # the tokens of uploads and multipart parts, and no other
_TOKEN_PATTERN = r"[A-Za-z0-9_-]{16,64}"
# The name may contain dots but must not start with one, so it can never be "." or "..".
_NAME_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,%d}" % (MAX_FILE_NAME_CHARS - 1)
_KEY_RE = re.compile(rf"(?P<token>{_TOKEN_PATTERN})/(?P<name>{_NAME_PATTERN})")  # used with fullmatch
# type/subtype plus optional parameters; no control characters, so it is safe in a header.
_CONTENT_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*( *;[\x20-\x7e]*)?$")


class StorageError(Exception):
    """A storage backend could not be configured or used."""


class InvalidKeyError(StorageError, KeyError):
    """A key that this storage could never have issued (wrong shape, traversal attempt)."""


class KeyExistsError(StorageError):
    """`put` of a key that is already stored (keys are written once)."""


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

    def new_key(self, file_name: str, *, prefix: str = "") -> str:
        """Reserve nothing, just mint a fresh unguessable key for `file_name` (for upload URLs), its
        token starting with `prefix` (`UPLOAD_KEY_PREFIX` for uploads)."""
        ...

    def put(
        self, data: bytes, *, content_type: str, file_name: str, key: str | None = None
    ) -> StoredFile:
        """Store `data` under `key` (a fresh key when None); an existing key is never overwritten
        (`KeyExistsError`)."""
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

    def purge(self, prefix: str, older_than: float) -> int:
        """Delete every file whose token starts with `prefix` and that was stored before `older_than`
        (epoch seconds), half-written ones included; how many were deleted."""
        ...


def is_valid_key(key: str) -> bool:
    """True when `key` has the shape this module issues (checked before any path is built)."""
    return isinstance(key, str) and _KEY_RE.fullmatch(key) is not None


def check_token_prefix(prefix: str) -> str:
    """`prefix` when it can begin a token (and is not empty: a purge never takes every file), else `ValueError`."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", prefix or ""):
        raise ValueError(f"not a key token prefix: {prefix!r}")
    return prefix


def key_token(key: str) -> str:
    """The token part of `key`; raises `InvalidKeyError` for anything this module could not have issued."""
    match = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise InvalidKeyError(f"invalid storage key {key!r}")
    return match["token"]


def new_key(file_name: str, *, prefix: str = "") -> str:
    """A fresh unguessable key `"{prefix}{token}/{safe name}"`; every backend mints its keys here.

    Without a prefix the token never starts with `UPLOAD_KEY_PREFIX` (drawn again in the rare case),
    so the upload retention can never take an output."""
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    while not prefix and token.startswith(UPLOAD_KEY_PREFIX):
        token = secrets.token_urlsafe(_TOKEN_BYTES)
    return f"{prefix}{token}/{safe_file_name(file_name)}"


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
