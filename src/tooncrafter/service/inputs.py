"""Turn an input URL from a request into image bytes, safely.

Three kinds of input URL are accepted (the `keyframe_image_urls` contract):
- `data:` URIs, decoded in place (base64 or percent-encoded), size-limited before decoding;
- URLs of this server's own storage (`{own base}/files/{key}`), read from storage without HTTP;
- `http(s)://` URLs, fetched with the guards a server fetching user-given URLs needs (SSRF):
  the host is resolved here and every address is checked (loopback, private, link-local including
  the cloud metadata address 169.254.169.254, CGNAT, multicast, reserved, and those same ranges
  embedded in IPv6), then the connection goes to the checked address itself with the original
  name in `Host` and TLS SNI/certificate checks, so a second DNS answer cannot swap in another
  address (DNS rebinding). Redirects are followed here, one hop at a time, each hop re-checked.
  The body is streamed under a byte cap and the whole fetch under one deadline.

Whatever the source, the bytes must look like an image (magic bytes), so a decoder never sees an
HTML error page. Errors are `InputError` with a message that names the problem; the caller adds
the field name (`keyframe_image_urls[1]: ...`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio
import httpx

from tooncrafter.media import MediaError
from tooncrafter.media.images import parse_data_uri
from tooncrafter.service.outbound import IPAddress, address_refusal_reason
from tooncrafter.service.storage.base import Storage, is_valid_key

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
USER_AGENT = "tooncrafter-input-fetcher/0.1"
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
"""`resolve(host, port)` -> every address the host name stands for."""
AddressPolicy = Callable[[IPAddress, int], bool]
"""`allowed(address, port)` -> whether the fetcher may connect there."""


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one input fetch; `allow_private` lifts the address checks (trusted networks only)."""

    max_bytes: int = 20 * MiB
    timeout_s: float = 20.0
    max_redirects: int = 5
    allow_private: bool = False


class InputError(ValueError):
    """An input URL that cannot be used; the message says why, without the field name."""


def default_address_policy(limits: FetchLimits) -> AddressPolicy:
    """Public addresses only, unless `limits.allow_private`."""

    def allowed(address: IPAddress, port: int) -> bool:
        return limits.allow_private or address_refusal_reason(address) is None

    return allowed


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """All addresses of `host` from the OS resolver (IP literals in any inet_aton form included)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InputError(f"cannot resolve host {host!r}") from exc
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


# -- content checks ----------------------------------------------------------------------------


def sniff_image_type(data: bytes) -> str | None:
    """The image MIME type that `data`'s magic bytes announce, or None if it is not a known image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM") and len(data) >= 26:
        return "image/bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    return None


def decode_data_uri(uri: str, *, max_bytes: int) -> tuple[str, bytes]:
    """`data:[<mediatype>][;base64],<data>` -> (lower-cased media type, bytes), refusing anything over
    `max_bytes` before decoding it (media.parse_data_uri, with its errors as `InputError`)."""
    try:
        return parse_data_uri(uri, max_bytes=max_bytes)
    except MediaError as exc:
        raise InputError(str(exc)) from exc


# -- the fetcher --------------------------------------------------------------------------------


async def fetch_input(
    url: str,
    *,
    limits: FetchLimits,
    storage: Storage,
    own_base_urls: Sequence[str],
    resolver: Resolver | None = None,
    address_policy: AddressPolicy | None = None,
    ssl_context: ssl.SSLContext | None = None,
    require_image: bool = True,
) -> bytes:
    """The bytes behind an input URL (data URI, own storage URL or public http(s) URL).

    `resolver`, `address_policy` and `ssl_context` default to the OS resolver, public addresses
    only (see `FetchLimits.allow_private`) and the system's CA bundle; tests and deployments with
    special networks replace them. Raises `InputError` for every problem with the URL or its content.
    """
    if not isinstance(url, str) or not url.strip():
        raise InputError("empty URL")
    url = url.strip()

    if url[:5].lower() == "data:":
        _, data = decode_data_uri(url, max_bytes=limits.max_bytes)
    elif (key := own_storage_key(url, own_base_urls)) is not None:
        data = await _read_own_file(storage, key, limits)
    else:
        try:
            with anyio.fail_after(limits.timeout_s):
                data = await _fetch_http(
                    url,
                    limits=limits,
                    resolver=resolver or system_resolver,
                    address_policy=address_policy or default_address_policy(limits),
                    ssl_context=ssl_context,
                )
        except TimeoutError:
            raise InputError(f"fetching the URL took longer than {limits.timeout_s:g} s") from None

    if require_image and sniff_image_type(data) is None:
        raise InputError("the content is not an image (expected PNG, JPEG, GIF, WebP, BMP or TIFF)")
    return data


def own_storage_key(url: str, own_base_urls: Sequence[str]) -> str | None:
    """The storage key when `url` is `{one of own_base_urls}/files/{key}`, else None."""
    for base in own_base_urls:
        prefix = base.rstrip("/") + "/files/"
        if base and url.startswith(prefix):
            return url[len(prefix) :].split("?", 1)[0].split("#", 1)[0]
    return None


async def _read_own_file(storage: Storage, key: str, limits: FetchLimits) -> bytes:
    stored = await anyio.to_thread.run_sync(storage.stat, key) if is_valid_key(key) else None
    if stored is None:
        raise InputError("no such file in this server's storage")
    if stored.size > limits.max_bytes:
        raise InputError(f"the file is larger than the limit of {limits.max_bytes} bytes")
    return await anyio.to_thread.run_sync(storage.read, key)


async def _fetch_http(
    url: str,
    *,
    limits: FetchLimits,
    resolver: Resolver,
    address_policy: AddressPolicy,
    ssl_context: ssl.SSLContext | None,
) -> bytes:
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise InputError(f"invalid URL ({exc})") from None

    for _hop in range(limits.max_redirects + 1):
        if current.scheme not in ("http", "https"):
            raise InputError(
                f"unsupported URL scheme {current.scheme!r}: use http(s), a data: URI or this server's file URL"
            )
        host = current.raw_host.decode("ascii")  # IDNA (punycode) form, as DNS and TLS see it
        if not host:
            raise InputError("URL has no host")
        port = current.port or (443 if current.scheme == "https" else 80)
        address = await _checked_address(host, port, resolver, address_policy)

        async with _pinned_client(limits, ssl_context) as client:
            request = _pinned_request(client, current, address)
            try:
                response = await client.send(request, stream=True)
            except httpx.TimeoutException:
                raise TimeoutError from None
            except httpx.HTTPError as exc:
                raise InputError(f"could not fetch the URL ({type(exc).__name__}: {exc})") from None
            except httpx.InvalidURL:  # httpx builds the next request of a redirect: data:, mailto:, http:x ...
                raise InputError("the URL redirects to something that is not an http(s) URL") from None
            try:
                if response.status_code in _REDIRECT_CODES and "location" in response.headers:
                    try:
                        target = current.join(response.headers["location"])
                    except (httpx.InvalidURL, ValueError) as exc:
                        raise InputError(f"the URL redirects to an invalid URL ({exc})") from None
                    logger.debug("input fetch: %s redirects to %s", current, target)
                    current = target
                    continue
                if response.status_code != 200:
                    raise InputError(f"the URL answered HTTP {response.status_code}")
                return await _read_capped(response, limits.max_bytes)
            finally:
                await response.aclose()
    raise InputError(f"too many redirects (more than {limits.max_redirects})")


async def _checked_address(host: str, port: int, resolver: Resolver, policy: AddressPolicy) -> IPAddress:
    """The address to connect to for `host`: every address it resolves to must pass `policy`."""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = await resolver(host, port)
    if not addresses:
        raise InputError(f"cannot resolve host {host!r}")
    for address in addresses:
        if not policy(address, port):
            reason = address_refusal_reason(address) or "not allowed"
            raise InputError(
                f"refusing to fetch from {host!r}: it resolves to a {reason} address ({address}); "
                "only public addresses are allowed"
            )
    return addresses[0]


def _pinned_client(limits: FetchLimits, ssl_context: ssl.SSLContext | None) -> httpx.AsyncClient:
    # One client per hop: a connection pool keyed by IP must never carry a TLS session that was
    # verified for another host name. trust_env=False: no proxy may take the pinned connection elsewhere.
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        verify=ssl_context if ssl_context is not None else True,
        timeout=httpx.Timeout(limits.timeout_s),
    )


def _pinned_request(client: httpx.AsyncClient, url: httpx.URL, address: IPAddress) -> httpx.Request:
    """A GET for `url` sent to `address`, carrying the name in Host and (for https) TLS SNI."""
    host_header = url.netloc.decode("ascii")  # name plus port when it is not the default
    extensions = {}
    if url.scheme == "https":
        host = url.raw_host.decode("ascii")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            extensions["sni_hostname"] = host
    return client.build_request(
        "GET",
        url.copy_with(host=str(address)),
        headers={
            "Host": host_header,
            "User-Agent": USER_AGENT,
            "Accept": "image/*,*/*;q=0.5",
            "Accept-Encoding": "identity",
        },
        extensions=extensions,
    )


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InputError(f"the file is larger than the limit of {max_bytes} bytes ({declared} bytes)")
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():  # decoded bytes: a compressed bomb is capped too
            body += chunk
            if len(body) > max_bytes:
                raise InputError(f"the file is larger than the limit of {max_bytes} bytes")
    except httpx.TimeoutException:
        raise TimeoutError from None
    except httpx.HTTPError as exc:
        raise InputError(f"could not read the response ({type(exc).__name__}: {exc})") from None
    return bytes(body)
