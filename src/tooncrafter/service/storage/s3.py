"""Stored files in an S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, Ceph, ...).

Same keys and semantics as `local.LocalFileStorage` (see `base.py`): a key `"{token}/{name}"` is the
object `"{prefix}/{token}/{name}"`, written once and never overwritten (`If-None-Match: *`, a
conditional write every current S3-compatible store honours), read whole or by byte range. The
content type lives on the object; the size comes from `HEAD`.

The bucket stays private: clients download through the API (`GET /files/{key}`), which streams
the object with Range support. Credentials come the usual boto3 way (environment
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `~/.aws`, an instance role); `endpoint_url` points
at a non-AWS store.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tooncrafter.service.storage.base import (
    READ_CHUNK_BYTES,
    InvalidKeyError,
    KeyExistsError,
    StorageError,
    StoredFile,
    check_token_prefix,
    is_valid_key,
    key_file_name,
    new_key,
    normalize_content_type,
)


class S3Storage:
    """Files as objects under `prefix` in `bucket`; thread-safe (one boto3 client, which is)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
    ) -> None:
        if not bucket:
            raise StorageError("an s3:// storage URL needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:
                raise StorageError("S3 storage needs boto3: pip install 'tooncrafter[s3]'") from exc
            client = boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                config=Config(max_pool_connections=32, retries={"max_attempts": 5, "mode": "standard"}),
            )
        self.client = client

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r})"

    # -- keys -----------------------------------------------------------------------------------

    def new_key(self, file_name: str, *, prefix: str = "") -> str:
        return new_key(file_name, prefix=prefix)

    def object_name(self, key: str) -> str:
        """The object name of `key`; raises `InvalidKeyError` for anything this storage did not issue."""
        if not is_valid_key(key):
            raise InvalidKeyError(f"invalid storage key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- Storage --------------------------------------------------------------------------------

    def put(self, data: bytes, *, content_type: str, file_name: str, key: str | None = None) -> StoredFile:
        from botocore.exceptions import ClientError

        if key is None:
            key = self.new_key(file_name)
        name = self.object_name(key)
        content_type = normalize_content_type(content_type)
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=name, Body=data, ContentType=content_type, IfNoneMatch="*"
            )
        except ClientError as exc:
            if _status(exc) in (409, 412):  # 412 PreconditionFailed; 409 when a concurrent write races
                raise KeyExistsError(f"storage key {key!r} already exists") from None
            raise StorageError(f"could not store {key!r} in s3://{self.bucket}: {exc}") from exc
        return StoredFile(key=key, size=len(data), content_type=content_type, file_name=key_file_name(key))

    def read(self, key: str) -> bytes:
        return self._get(key)["Body"].read()

    def open_range(self, key: str, start: int, end: int) -> bytes:
        return b"".join(self.iter_range(key, start, end))

    def iter_range(self, key: str, start: int, end: int, chunk_size: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        if start < 0 or end < start - 1:
            raise ValueError(f"invalid byte range {start}-{end}")
        if end < start:  # an empty file: S3 has no empty range
            self._require(key)
            return iter(())
        body = self._get(key, Range=f"bytes={start}-{end}")["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

        return chunks()

    def stat(self, key: str) -> StoredFile | None:
        from botocore.exceptions import ClientError

        if not is_valid_key(key):
            return None
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.object_name(key))
        except ClientError as exc:
            if _status(exc) in (403, 404):
                return None
            raise
        return StoredFile(
            key=key,
            size=int(head["ContentLength"]),
            content_type=normalize_content_type(head.get("ContentType")),
            file_name=key_file_name(key),
        )

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error (deletes are idempotent)."""
        if not is_valid_key(key):
            return
        self.client.delete_object(Bucket=self.bucket, Key=self.object_name(key))

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def purge(self, prefix: str, older_than: float) -> int:
        """See `Storage.purge`: one listing of the objects under the prefix, deletes in batches of 1,000."""
        check_token_prefix(prefix)
        listed = f"{self.prefix}/{prefix}" if self.prefix else prefix
        expired = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=listed):
            expired += [{"Key": o["Key"]} for o in page.get("Contents", []) if o["LastModified"].timestamp() < older_than]
        for start in range(0, len(expired), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": expired[start : start + 1000], "Quiet": True})
        return len(expired)

    # -- helpers --------------------------------------------------------------------------------

    def _get(self, key: str, **extra: Any) -> dict:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.object_name(key), **extra)
        except ClientError as exc:
            if _status(exc) in (403, 404) or _code(exc) == "NoSuchKey":
                raise FileNotFoundError(f"no stored file {key!r}") from None
            raise

    def _require(self, key: str) -> None:
        if self.stat(key) is None:
            raise FileNotFoundError(f"no stored file {key!r}")


def _status(exc: Any) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _code(exc: Any) -> str | None:
    return exc.response.get("Error", {}).get("Code")
