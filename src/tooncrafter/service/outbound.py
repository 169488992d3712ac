"""One policy for every address the server connects to on a user's behalf: input URLs and webhooks.

A URL given by a client must not make the server reach its own network (SSRF): the host is resolved
once, every address it stands for is judged by `address_refusal_reason` (loopback, private,
link-local with the cloud metadata address, CGNAT, multicast, reserved, and the same ranges embedded
in IPv6), and the connection then goes to the checked address itself, with the original name in
`Host` and TLS SNI, so a second DNS answer cannot swap in another address (DNS rebinding). A name
that does not resolve is refused, never waved through. `inputs.py` fetches keyframes this way
(asynchronously, following redirects hop by hop), `webhooks.py` posts deliveries this way.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class OutboundURLError(ValueError):
    """A URL the server must not (or cannot) connect to; the message says why."""


_V4_REFUSED: list[tuple[ipaddress.IPv4Network, str]] = [
    (ipaddress.IPv4Network(net), reason)
    for net, reason in [
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved (documentation)"),
        ("192.88.99.0/24", "reserved (6to4 relay)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved (benchmarking)"),
        ("198.51.100.0/24", "reserved (documentation)"),
        ("203.0.113.0/24", "reserved (documentation)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes the broadcast address 255.255.255.255
    ]
]
_V6_REFUSED: list[tuple[ipaddress.IPv6Network, str]] = [
    (ipaddress.IPv6Network(net), reason)
    for net, reason in [
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "reserved (IPv4-compatible)"),
        ("64:ff9b:1::/48", "private (local NAT64)"),
        ("100::/64", "reserved (discard)"),
        ("2001:db8::/32", "reserved (documentation)"),
        ("fc00::/7", "private (unique local)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    ]
]
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def address_refusal_reason(address: IPAddress) -> str | None:
    """Why a fetch must not connect to `address` ("loopback", "private", ...), or None if it is public.

    IPv6 forms that carry an IPv4 address (mapped `::ffff:a.b.c.d`, NAT64, 6to4, Teredo) are judged
    by the IPv4 address inside.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return address_refusal_reason(embedded)
        table: Sequence[tuple[ipaddress._BaseNetwork, str]] = _V6_REFUSED
    else:
        table = _V4_REFUSED
    for network, reason in table:
        if address in network:
            return reason
    # Whatever the tables miss (new IANA special-purpose blocks) is still not a public address.
    return None if address.is_global else "non-public"


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # (server, client): the client is where traffic ends up
    return None


def check_url_syntax(url: str, what: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an absolute http(s) URL, or `OutboundURLError` naming `what`."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise OutboundURLError(f"{what} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise OutboundURLError(f"{what} must be an absolute http(s) URL")
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise OutboundURLError(f"{what} has an invalid IPv6 address {host!r}") from None
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


def resolve_checked(host: str, port: int, *, allow_private: bool) -> IPAddress:
    """The address to connect to for `host`: it must resolve, and every address must be allowed."""
    try:
        addresses: Sequence[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise OutboundURLError(f"cannot resolve host {host!r} ({exc})") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
    if not addresses:
        raise OutboundURLError(f"cannot resolve host {host!r}")
    if not allow_private:
        for address in addresses:
            reason = address_refusal_reason(address)
            if reason is not None:
                raise OutboundURLError(f"{host!r} resolves to a {reason} address ({address}); only public addresses are allowed")
    return addresses[0]


def pinned_post(client: httpx.Client, url: str, body: bytes, headers: dict[str, str], *, allow_private: bool) -> httpx.Response:
    """POST `body` to `url`, connected to the address that was checked (Host and SNI keep the name)."""
    scheme, host, port = check_url_syntax(url, "the webhook URL")
    address = resolve_checked(host, port, allow_private=allow_private)
    target = httpx.URL(url)
    extensions = {}
    if scheme == "https":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            extensions["sni_hostname"] = host
    request = client.build_request(
        "POST",
        target.copy_with(host=str(address)),
        content=body,
        headers={**headers, "Host": target.netloc.decode("ascii")},
        extensions=extensions,
    )
    return client.send(request)
