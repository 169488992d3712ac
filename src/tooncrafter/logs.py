"""Logging for every process: plain text or one JSON object per line, never a secret.

`configure_logging(level, format)` is called once by the CLI. Every record passes through
`RedactingFilter`: URLs lose their user info, query string and fragment (signed URLs and tokens
live there), and `Authorization`-style values are masked, whichever library logged them (httpx
logs every request URL at INFO). `TOONCRAFTER_LOG_FORMAT=json` gives one JSON object per line with
the time, level, logger, message, and the request id of the job or HTTP request being handled
(`request_id_var`, set by the service), so a log pipeline can follow one request across processes.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tooncrafter_request_id", default=None)
"""The fal request id being worked on in this thread or task (None outside a request)."""

_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@?#]*@)?(?P<rest>[^\s?#\"'<>]*)(?P<tail>[?#][^\s\"'<>]*)?")
_PATH_QUERY = re.compile(r"(?P<path>(?:^|(?<=[\s\"']))/[^\s?#\"']*)[?#][^\s\"']*")  # request targets, as in access logs
_SECRET_VALUE = re.compile(r"(?i)\b(authorization|x-fal-key|api[_-]?key|token|password|secret)([\"']?\s*[:=]\s*[\"']?)(key\s+|bearer\s+)?[^\s\"',;]+")


def redact_url(url: str) -> str:
    """`url` without user info, query string or fragment: what may appear in a log line."""
    return _URL.sub(_redact_match, url)


def _redact_match(match: re.Match[str]) -> str:
    userinfo = "***@" if match.group("userinfo") else ""
    tail = "?***" if match.group("tail") else ""
    return f"{match.group('scheme')}{userinfo}{match.group('rest')}{tail}"


def redact(text: str) -> str:
    """Every URL and request path in `text` without its query string (`redact_url`), secret-looking
    `name: value` pairs masked."""
    text = _PATH_QUERY.sub(lambda m: f"{m.group('path')}?***", _URL.sub(_redact_match, text))
    return _SECRET_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (arguments merged in) with `redact`, so no handler sees a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id (when handling one), exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info or record.exc_text:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: int = logging.INFO, log_format: LogFormat = "text") -> None:
    """Root logging for a process: one stderr handler, redacted, text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn installs its own handlers: route them through ours so its lines are redacted too
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
