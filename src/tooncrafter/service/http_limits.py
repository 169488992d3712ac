"""Connection limits uvicorn lacks, so that one client cannot take the embedded server down.

uvicorn bounds request sizes but not time or count: a connection whose headers never finish stays
open for ever (its keep-alive timer is reset by every byte and never armed before the first
request), and every accepted connection holds a file descriptor until the process runs out and the
accept loop floods the log with EMFILE. `GuardedH11Protocol` is uvicorn's h11 protocol with:

* a cap on open connections: past `max_connections` a new connection gets a bare 503 and is closed
  before anything of it is read, so descriptors stay bounded and the server keeps answering;
* a deadline for each request's headers (`header_timeout_s` from the request's first byte, or from
  the connection when nothing comes) and one for its body (`body_timeout_s` once the headers are in):
  a client that trickles bytes is disconnected without an answer. Responses, SSE streams included,
  are never timed: the deadlines end when the request has been received.

`guarded_protocol(...)` makes the class with the limits bound (uvicorn instantiates it itself).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

_FULL_BODY = b'{"detail":"too many open connections; try again shortly"}'
FULL_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"retry-after: 1\r\ncontent-length: " + str(len(_FULL_BODY)).encode() + b"\r\n\r\n" + _FULL_BODY
)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and request-receipt deadlines (see the module)."""

    max_connections = 4096
    header_timeout_s = 10.0
    body_timeout_s = 120.0
    _deadline_kind = "header"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(FULL_RESPONSE)
            transport.close()
            return
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm(self.header_timeout_s)  # the next request on a kept-alive connection starts
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request()  # pipelined requests were handled inside

    def _follow_request(self) -> None:
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._deadline_kind != "body":
            self._arm(self.body_timeout_s, kind="body")
        elif state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()

    def _arm(self, seconds: float, kind: str = "header") -> None:
        self._disarm()
        self._deadline_kind = kind
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._deadline_kind = "header"

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            logger.debug("closing %s: request %s not received in time", self.client, self._deadline_kind)
            self.transport.close()


def guarded_protocol(*, max_connections: int, header_timeout_s: float, body_timeout_s: float) -> type[GuardedH11Protocol]:
    """`GuardedH11Protocol` with these limits, for `uvicorn.run(http=...)`."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"max_connections": max_connections, "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft descriptor limit towards `wanted` (never above the hard limit); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
