"""Log lines carry no secrets, and the JSON format is one object per line with the request id."""

from __future__ import annotations

import io
import json
import logging

import pytest

from tooncrafter.logs import (
    JsonFormatter,
    RedactingFilter,
    redact,
    redact_url,
    request_id_var,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pass@example.com/a.png?X-Amz-Signature=abc#f", "https://***@example.com/a.png?***"),
        ("http://example.com/a.png", "http://example.com/a.png"),
        ("https://bucket.s3.amazonaws.com/k?token=s3cr3t", "https://bucket.s3.amazonaws.com/k?***"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_masks_keys_and_urls_inside_text() -> None:
    text = 'fetch https://u:p@h/x?sig=1 failed; headers {"Authorization": "Key abc123"} api_key=zzz'
    cleaned = redact(text)
    for secret in ("u:p", "sig=1", "abc123", "zzz"):
        assert secret not in cleaned
    assert "https://***@h/x?***" in cleaned
    access = redact('127.0.0.1:5 - "GET /files/abc?token=s1gn3d HTTP/1.1" 200')
    assert "s1gn3d" not in access and '"GET /files/abc?*** HTTP/1.1" 200' in access


def _capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test-logs-{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_lines_carry_the_request_id_and_no_secret() -> None:
    logger, stream = _capture(JsonFormatter())
    token = request_id_var.set("req-123")
    try:
        logger.info("HTTP Request: GET %s", "https://cdn.example.com/a.png?X-Amz-Credential=AKIA")
    finally:
        request_id_var.reset(token)
    logger.info("outside a request")
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["request_id"] == "req-123" and first["level"] == "INFO"
    assert "AKIA" not in first["message"] and first["message"].endswith("a.png?***")
    assert "request_id" not in second


def test_exceptions_are_redacted_too() -> None:
    logger, stream = _capture(logging.Formatter("%(message)s"))
    try:
        raise RuntimeError("could not fetch https://x.example/a?token=t0k")
    except RuntimeError:
        logger.exception("failed")
    assert "t0k" not in stream.getvalue() and "RuntimeError" in stream.getvalue()
