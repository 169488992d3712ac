"""Fixtures of the service tests: the two storage backends (local files, S3 on moto's server)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from helpers.service import moto_s3, storage_settings


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One moto S3 server for the session (each test takes a fresh bucket)."""
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def storage_backend(request) -> dict[str, Any]:
    """Settings overrides for files on local disk, then in a fresh S3 bucket."""
    endpoint = request.getfixturevalue("s3_endpoint") if request.param == "s3" else None
    return storage_settings(request.param, endpoint)
