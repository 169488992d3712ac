"""Where uploaded inputs and generated videos live: one interface (`base.Storage`), two backends.

`storage_from_url` picks the backend a `STORAGE_URL` names: `file:///abs/dir` for one machine (or a
shared file system, `local.LocalFileStorage`), `s3://bucket/prefix` for scale-out (`s3.S3Storage`,
same methods, keys mapping to object names `prefix/token/name`). Upload tokens that any API process
accepts are in `upload_tokens`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from tooncrafter.service.storage.base import Storage, StorageError
from tooncrafter.service.storage.local import LocalFileStorage
from tooncrafter.service.storage.s3 import S3Storage


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
