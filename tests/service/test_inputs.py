"""Input fetching: data URIs, own-storage URLs, and http(s) with the SSRF guards.

Every network test talks only to servers on 127.0.0.1. Refused addresses are refused before any
connection (a guard fixture fails the test if a connection is attempted); "public" servers are
simulated by an injected resolver and address policy that treat one loopback port as public.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import trustme

from tooncrafter.service.inputs import (
    FetchLimits,
    InputError,
    decode_data_uri,
    fetch_input,
    sniff_image_type,
)
from tooncrafter.service.outbound import address_refusal_reason
from tooncrafter.service.storage.local import LocalFileStorage

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64
OPEN = FetchLimits(allow_private=True, timeout_s=5)


def run(coro):  # noqa: ANN001, ANN201 - tiny sync bridge, no pytest-asyncio here
    return asyncio.run(coro)


@pytest.fixture
def storage(tmp_path: Path) -> LocalFileStorage:
    return LocalFileStorage(tmp_path / "files")


# -- a loopback HTTP server ---------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    seen_hosts: list[str]
    other_port: int = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.seen_hosts.append(self.headers.get("Host", ""))  # type: ignore[attr-defined]
        path = self.path
        if path == "/img.png":
            self._send(200, PNG, "image/png")
        elif path == "/page":
            self._send(200, b"<html>not an image</html>", "text/html")
        elif path == "/big":
            self._send(200, PNG + bytes(100_000), "image/png")
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in [PNG] + [bytes(8192)] * 20:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/slow":
            time.sleep(3)
            self._send(200, PNG, "image/png")
        elif path == "/missing":
            self._send(404, b"nope", "text/plain")
        elif path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", path.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(307)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.seen_hosts = []  # type: ignore[attr-defined]
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def seen_hosts(self) -> list[str]:
        return self.httpd.seen_hosts  # type: ignore[attr-defined]

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


@pytest.fixture
def other_server() -> Iterator[Server]:
    with Server() as s:
        yield s


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the fetcher tries to open any connection at all."""

    async def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused URL reached the network")

    monkeypatch.setattr(httpx.AsyncClient, "send", refuse)


def fetch(url: str, storage: LocalFileStorage, limits: FetchLimits = FetchLimits(), **kwargs: object) -> bytes:
    return run(fetch_input(url, limits=limits, storage=storage, own_base_urls=kwargs.pop("own", []), **kwargs))


def only_port_is_public(port: int):  # noqa: ANN201
    """An address policy for which 127.0.0.1:port stands in for a public server, nothing else is allowed."""

    def allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, p: int) -> bool:
        return str(address) == "127.0.0.1" and p == port

    return allowed


def fake_dns(table: dict[str, list[str]]):  # noqa: ANN201
    async def resolve(host: str, port: int) -> list:
        if host not in table:
            raise InputError(f"cannot resolve host {host!r}")
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve


# -- content sniffing and data URIs -------------------------------------------------------------


@pytest.mark.parametrize(
    "data, expected",
    [
        (PNG, "image/png"),
        (JPEG, "image/jpeg"),
        (b"GIF89a....", "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"BM" + bytes(40), "image/bmp"),
        (b"II*\x00" + bytes(8), "image/tiff"),
        (b"<html>", None),
        (b"", None),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
    ],
)
def test_sniff_image_type(data: bytes, expected: str | None) -> None:
    assert sniff_image_type(data) == expected


def test_data_uris(storage: LocalFileStorage) -> None:
    encoded = base64.b64encode(PNG).decode()
    assert fetch(f"data:image/png;base64,{encoded}", storage) == PNG
    assert fetch(f"data:image/PNG;base64,{encoded}", storage) == PNG  # fal_client.encode_image(format="PNG")
    assert fetch(f"DATA:image/png;base64,{encoded.rstrip('=')}", storage) == PNG  # no padding
    assert fetch(f"data:image/png;base64,{base64.urlsafe_b64encode(PNG).decode()}", storage) == PNG
    wrapped = "\n".join(encoded[i : i + 20] for i in range(0, len(encoded), 20))
    assert fetch(f"data:image/png;base64,{wrapped}", storage) == PNG
    assert fetch(f"data:image/png,{quote(PNG)}", storage) == PNG  # percent-encoded, no base64
    assert decode_data_uri(f"data:image/PNG;base64,{encoded}", max_bytes=1000)[0] == "image/png"


@pytest.mark.parametrize(
    "uri, message",
    [
        ("data:image/png;base64,!!!not-base64!!!", "invalid base64"),
        ("data:image/png;base64", "malformed"),
        (f"data:text/html;base64,{base64.b64encode(b'<html>').decode()}", "not an image"),
        (f"data:image/png;base64,{base64.b64encode(PNG + bytes(2000)).decode()}", "larger than the limit"),
        (f"data:image/png,{quote(PNG + bytes(2000))}", "larger than the limit"),
    ],
)
def test_bad_data_uris(storage: LocalFileStorage, uri: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        fetch(uri, storage, FetchLimits(max_bytes=1000))


# -- own storage --------------------------------------------------------------------------------


def test_own_storage_urls_are_read_without_http(storage: LocalFileStorage, no_connections: None) -> None:
    key = storage.put(PNG, content_type="image/png", file_name="a.png").key
    own = ["http://127.0.0.1:8000", "https://api.example.test/"]
    assert fetch(f"http://127.0.0.1:8000/files/{key}", storage, own=own) == PNG
    assert fetch(f"https://api.example.test/files/{key}?download=1", storage, own=own) == PNG
    with pytest.raises(InputError, match="no such file"):
        fetch("http://127.0.0.1:8000/files/aaaaaaaaaaaaaaaaaaaaaaaa/a.png", storage, own=own)
    with pytest.raises(InputError, match="no such file"):
        fetch("http://127.0.0.1:8000/files/../../etc/passwd", storage, own=own)
    with pytest.raises(InputError, match="larger than the limit"):
        fetch(f"http://127.0.0.1:8000/files/{key}", storage, FetchLimits(max_bytes=10), own=own)
    # Another host's /files/ path is not ours: it goes through the address checks (and is refused).
    with pytest.raises(InputError, match="loopback"):
        fetch(f"http://127.0.0.1:9999/files/{key}", storage, own=own)


def test_own_storage_file_must_be_an_image(storage: LocalFileStorage) -> None:
    key = storage.put(b"plain text", content_type="text/plain", file_name="a.txt").key
    with pytest.raises(InputError, match="not an image"):
        fetch(f"http://own.test/files/{key}", storage, own=["http://own.test"])


# -- refused addresses (no connection is ever attempted) ----------------------------------------


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1/x.png", "loopback"),
        ("http://127.1.2.3:8080/x.png", "loopback"),
        ("http://localhost/x.png", "loopback"),
        ("http://LOCALHOST:8000/x.png", "loopback"),
        ("http://localhost./x.png", "loopback|cannot resolve"),  # trailing dot: resolver-dependent
        ("http://10.1.2.3/x.png", "private"),
        ("http://172.16.0.1/x.png", "private"),
        ("http://192.168.1.1/x.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://100.64.0.1/x.png", "CGNAT"),
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://224.0.0.1/x.png", "multicast"),
        ("http://255.255.255.255/x.png", "reserved"),
        ("http://[::1]/x.png", "loopback"),
        ("http://[::]/x.png", "unspecified"),
        ("http://[::ffff:127.0.0.1]/x.png", "loopback"),
        ("http://[::ffff:169.254.169.254]/x.png", "link-local"),
        ("http://[64:ff9b::a00:1]/x.png", "private"),  # NAT64 of 10.0.0.1
        ("http://[2002:c0a8:101::1]/x.png", "private"),  # 6to4 of 192.168.1.1
        ("http://[fc00::1]/x.png", "private"),
        ("http://[fd12:3456::1]/x.png", "private"),
        ("http://[fe80::1]/x.png", "link-local"),
        ("http://[ff02::1]/x.png", "multicast"),
        ("http://2130706433/x.png", "loopback"),  # decimal 127.0.0.1
        ("http://0x7f000001/x.png", "loopback"),  # hex
        ("http://0x7f.1/x.png", "loopback"),  # short form
        ("https://127.0.0.1/x.png", "loopback"),
    ],
)
def test_private_addresses_are_refused(storage: LocalFileStorage, no_connections: None, url: str, reason: str) -> None:
    with pytest.raises(InputError, match=reason):
        fetch(url, storage)


@pytest.mark.parametrize("url", ["http://0177.0.0.1/x.png", "http://[::1/x.png", "http:///x.png"])
def test_malformed_urls_are_refused(storage: LocalFileStorage, no_connections: None, url: str) -> None:
    with pytest.raises(InputError):
        fetch(url, storage)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/x.png", "gopher://example.com/", "javascript:alert(1)", "x.png"]
)
def test_other_schemes_are_refused(storage: LocalFileStorage, no_connections: None, url: str) -> None:
    with pytest.raises(InputError, match="scheme"):
        fetch(url, storage)


def test_name_resolving_to_any_private_address_is_refused(storage: LocalFileStorage, no_connections: None) -> None:
    dns = fake_dns({"mixed.test": ["93.184.216.34", "10.0.0.7"], "rebind.test": ["192.168.0.10"]})
    with pytest.raises(InputError, match=r"private address \(10\.0\.0\.7\)"):
        fetch("http://mixed.test/x.png", storage, resolver=dns)
    with pytest.raises(InputError, match="private"):
        fetch("https://rebind.test/x.png", storage, resolver=dns)


@pytest.mark.parametrize(
    "address, reason",
    [
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("2001:db8::1", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("192.0.2.1", "documentation"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "documentation"),  # Teredo, client 192.0.2.45
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"),  # Teredo, client 10.0.0.1
    ],
)
def test_address_refusal_reason(address: str, reason: str | None) -> None:
    result = address_refusal_reason(ipaddress.ip_address(address))
    assert (result is None) if reason is None else (reason in result)


# -- fetching from loopback servers that stand in for public ones -------------------------------


def test_fetch_image_from_allowed_server(storage: LocalFileStorage, server: Server) -> None:
    assert fetch(f"{server.url}/img.png", storage, OPEN) == PNG


def test_connection_is_pinned_to_the_checked_address(storage: LocalFileStorage, server: Server) -> None:
    """The name is resolved once by our resolver; the request goes to that address, Host keeps the name."""
    dns = fake_dns({"images.test": ["127.0.0.1"]})
    data = fetch(
        f"http://images.test:{server.port}/img.png",
        storage,
        resolver=dns,
        address_policy=only_port_is_public(server.port),
    )
    assert data == PNG
    assert server.seen_hosts == [f"images.test:{server.port}"]


def test_redirects_are_followed_and_each_hop_rechecked(
    storage: LocalFileStorage, server: Server, other_server: Server
) -> None:
    policy = only_port_is_public(server.port)
    # A redirect within the allowed server is followed ...
    assert fetch(f"{server.url}/redirect?to=/img.png", storage, address_policy=policy) == PNG
    # ... one to a loopback address (another port: not "public") is refused, and never contacted.
    target = f"{other_server.url}/img.png"
    with pytest.raises(InputError, match="loopback"):
        fetch(f"{server.url}/redirect?to={target}", storage, address_policy=policy)
    with pytest.raises(InputError, match="loopback"):
        fetch(f"{server.url}/redirect?to=http://localhost:{other_server.port}/img.png", storage, address_policy=policy)
    with pytest.raises(InputError, match="link-local"):
        fetch(f"{server.url}/redirect?to=http://169.254.169.254/latest/", storage, address_policy=policy)
    with pytest.raises(InputError, match="scheme"):
        fetch(f"{server.url}/redirect?to=file:///etc/passwd", storage, address_policy=policy)
    assert other_server.seen_hosts == []
    # With private addresses allowed the same cross-server redirect works.
    assert fetch(f"{server.url}/redirect?to={target}", storage, OPEN) == PNG


def test_too_many_redirects(storage: LocalFileStorage, server: Server) -> None:
    with pytest.raises(InputError, match="too many redirects"):
        fetch(f"{server.url}/loop", storage, FetchLimits(allow_private=True, max_redirects=3))
    assert len(server.seen_hosts) == 4


def test_non_image_content_is_refused(storage: LocalFileStorage, server: Server) -> None:
    with pytest.raises(InputError, match="not an image"):
        fetch(f"{server.url}/page", storage, OPEN)


def test_http_errors_are_reported(storage: LocalFileStorage, server: Server) -> None:
    with pytest.raises(InputError, match="HTTP 404"):
        fetch(f"{server.url}/missing", storage, OPEN)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    closed_port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(InputError, match="could not fetch"):
        fetch(f"http://127.0.0.1:{closed_port}/img.png", storage, OPEN)


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
def test_size_limit(storage: LocalFileStorage, server: Server, path: str) -> None:
    limits = FetchLimits(allow_private=True, max_bytes=50_000)
    with pytest.raises(InputError, match="larger than the limit"):
        fetch(f"{server.url}{path}", storage, limits)
    assert len(fetch(f"{server.url}{path}", storage, FetchLimits(allow_private=True, max_bytes=1_000_000))) > 50_000


def test_timeout(storage: LocalFileStorage, server: Server) -> None:
    with pytest.raises(InputError, match="longer than 0.5 s"):
        fetch(f"{server.url}/slow", storage, FetchLimits(allow_private=True, timeout_s=0.5))


# -- https: the pinned connection still checks the certificate against the name -----------------


@pytest.fixture(scope="module")
def tls() -> tuple[trustme.CA, ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("images.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return ca, server_ctx, client_ctx


def test_https_pinned_with_sni_and_certificate_check(
    storage: LocalFileStorage, tls: tuple[trustme.CA, ssl.SSLContext, ssl.SSLContext]
) -> None:
    _, server_ctx, client_ctx = tls
    dns = fake_dns({"images.test": ["127.0.0.1"], "impostor.test": ["127.0.0.1"]})
    with Server(tls=server_ctx) as https_server:
        policy = only_port_is_public(https_server.port)
        url = f"https://images.test:{https_server.port}/img.png"
        assert fetch(url, storage, resolver=dns, address_policy=policy, ssl_context=client_ctx) == PNG
        assert https_server.seen_hosts == [f"images.test:{https_server.port}"]
        # Same address, but the certificate is not for this name: the TLS check must fail.
        with pytest.raises(InputError, match="could not fetch"):
            fetch(
                f"https://impostor.test:{https_server.port}/img.png",
                storage,
                resolver=dns,
                address_policy=policy,
                ssl_context=client_ctx,
            )
