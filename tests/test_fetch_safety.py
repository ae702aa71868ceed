"""Fetch safety against real loopback servers: the whole-fetch deadline (slow status line, slow
headers, slow body) and the address check (every non-global range, host:port-aware allowed hosts).
IP literals only: nothing here asks DNS."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from PIL import Image

from pipeline.addresses import AllowedHosts, forbidden_reason, parse_host_port
from pipeline.deadline import DeadlineBackend, deadline_client
from pipeline.images import ImageIntake
from pipeline.settings import load_settings
from schemas.images import IntakeFailure, PreparedImage
from schemas.results import ErrorCode


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 100, 50)).save(buffer, "PNG")
    return buffer.getvalue()


# --- the whole-fetch deadline ----------------------------------------------------------------
class Dribbler:
    """A raw TCP server that answers every connection by sending `script` a byte at a time, one
    byte per `pace` seconds: no HTTP library in between, so the bytes arrive exactly that slowly."""

    def __init__(self, script: bytes, pace: float) -> None:
        self.script, self.pace = script, pace
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            threading.Thread(target=self._dribble, args=(connection,), daemon=True).start()

    def _dribble(self, connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            for byte in self.script:
                if self.stop.is_set():
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(self.pace)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


ENDLESS_HEADER = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000
SLOW_STATUS = b"HTTP/1.1 200 OK" + b" " * 10_000
SLOW_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"\xff" * 10_000


@pytest.fixture
def dribbler() -> Iterator[Callable[[bytes], Dribbler]]:
    servers: list[Dribbler] = []

    def start(script: bytes) -> Dribbler:
        servers.append(Dribbler(script, pace=0.2))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize("script", [ENDLESS_HEADER, SLOW_STATUS, SLOW_BODY], ids=["headers", "status", "body"])
def test_a_slow_answer_is_cut_off_at_the_whole_fetch_deadline(
    dribbler: Callable[[bytes], Dribbler], script: bytes
) -> None:
    # Each byte comes well within the read timeout; only a deadline over the whole fetch stops it.
    server = dribbler(script)
    address = f"127.0.0.1:{server.port}"
    intake = ImageIntake(load_settings(allowed_hosts=[address], fetch_total_timeout_s=1.5, fetch_read_timeout_s=1.0))
    started = time.monotonic()
    outcome = intake.prepare(f"http://{address}/x.png")
    elapsed = time.monotonic() - started
    assert isinstance(outcome, IntakeFailure) and outcome.error.code == ErrorCode.TIMEOUT, outcome
    assert 1.3 < elapsed < 3.0, elapsed


def test_the_deadline_ends_with_its_fetch(dribbler: Callable[[bytes], Dribbler]) -> None:
    slow = dribbler(ENDLESS_HEADER)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), PngServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    good = f"127.0.0.1:{httpd.server_address[1]}"
    intake = ImageIntake(load_settings(allowed_hosts=[f"127.0.0.1:{slow.port}", good], fetch_total_timeout_s=1.0))
    try:
        assert isinstance(intake.prepare(f"http://127.0.0.1:{slow.port}/x.png"), IntakeFailure)
        assert isinstance(intake.prepare(f"http://{good}/x.png"), PreparedImage)  # a fresh deadline
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_client_uses_the_deadline_backend() -> None:
    # deadline_client reaches into httpx's transport; an httpx upgrade that moves it fails here.
    client = deadline_client()
    assert isinstance(client._transport._pool._network_backend, DeadlineBackend)  # type: ignore[attr-defined]
    client.close()


# --- the address check -----------------------------------------------------------------------
REFUSED = [
    "::7f00:1",  # IPv4-compatible 127.0.0.1
    "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254
    "::808:808",  # IPv4-compatible, even around a public address: deprecated, never routed
    "::ffff:0:7f00:1",  # SIIT 127.0.0.1
    "::ffff:0:a00:1",  # SIIT 10.0.0.1
    "64:ff9b:1::7f00:1",  # NAT64 local-use
    "64:ff9b:1:ffff::808:808",  # NAT64 local-use: the site decides where it goes
    "64:ff9b::7f00:1",  # NAT64 well-known, loopback inside
    "64:ff9b::a9fe:a9fe",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "2002:7f00:1::1",  # 6to4 127.0.0.1
    "2002:a00:1::1",  # 6to4 10.0.0.1
    "2002:c0a8:101::1",  # 6to4 192.168.1.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo, client 192.0.2.45
    "::",
    "::1",
    "fe80::1",
    "fc00::1",
    "ff02::1",
    "100::1",  # discard-only
    "2001:db8::1",  # documentation
    "0.0.0.0",
    "127.0.0.2",
    "10.255.255.255",
    "100.64.0.1",
    "169.254.169.254",
    "192.0.0.1",
    "192.0.2.1",
    "198.18.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
]
ALLOWED = ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize("address", REFUSED)
def test_every_non_global_range_is_refused(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_global_addresses_pass(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address", [a for a in REFUSED if ":" in a and a not in {"::"}])
def test_a_refused_ipv6_literal_in_a_url_never_connects(address: str) -> None:
    outcome = ImageIntake(load_settings()).prepare(f"http://[{address}]:8765/x.jpg")
    assert isinstance(outcome, IntakeFailure) and outcome.error.code == ErrorCode.FORBIDDEN_ADDRESS, outcome


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [("cdn.example.com", ("cdn.example.com", None)), ("CDN.Example.com.", ("cdn.example.com", None)),
     ("127.0.0.1:8765", ("127.0.0.1", 8765)), ("[::1]:8765", ("::1", 8765)), ("[::1]", ("::1", None)),
     ("::1", ("::1", None)), ("[0:0::1]:80", ("::1", 80)), ("img.example.com:443", ("img.example.com", 443))],
)  # fmt: skip
def test_allowed_host_entries(entry: str, parsed: tuple[str, int | None]) -> None:
    assert parse_host_port(entry) == parsed


def test_a_bare_allowed_host_opens_only_the_default_ports() -> None:
    allowed = AllowedHosts.parse(["cdn.example.com", "127.0.0.1:8765"])
    assert allowed.allows("cdn.example.com", 443) and allowed.allows("CDN.example.com", 80)
    assert not allowed.allows("cdn.example.com", 6379)
    assert allowed.allows("127.0.0.1", 8765)
    assert not allowed.allows("127.0.0.1", 6390) and not allowed.allows("127.0.0.1", 80)


class PngServer(BaseHTTPRequestHandler):
    """/x.png: an image; /redirect?to=URL: a 302 there. Records the paths it was asked for."""

    seen: ClassVar[list[str]] = []
    body = png()

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        type(self).seen.append(self.path)
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


class V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest.fixture
def servers() -> Iterator[dict[str, str]]:
    """Two IPv4 loopback servers (an image host and a stand-in for Redis) and one on [::1]."""
    PngServer.seen = []
    running = [ThreadingHTTPServer(("127.0.0.1", 0), PngServer), ThreadingHTTPServer(("127.0.0.1", 0), PngServer)]
    with contextlib.suppress(OSError):  # no IPv6 loopback on this machine
        running.append(V6Server(("::1", 0), PngServer))
    for httpd in running:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    names = {"image": f"127.0.0.1:{running[0].server_address[1]}", "other": f"127.0.0.1:{running[1].server_address[1]}"}
    if len(running) == 3:
        names["v6"] = f"[::1]:{running[2].server_address[1]}"
    yield names
    for httpd in running:
        httpd.shutdown()
        httpd.server_close()


def test_an_allowed_host_does_not_open_its_other_ports_to_redirects(servers: dict[str, str]) -> None:
    intake = ImageIntake(load_settings(allowed_hosts=[servers["image"]]))
    outcome = intake.prepare(f"http://{servers['image']}/redirect?to=http://{servers['other']}/x.png")
    assert isinstance(outcome, IntakeFailure) and outcome.error.code == ErrorCode.FORBIDDEN_ADDRESS, outcome
    assert PngServer.seen == [f"/redirect?to=http://{servers['other']}/x.png"]  # the other port saw nothing
    assert isinstance(intake.prepare(f"http://{servers['image']}/x.png"), PreparedImage)


def test_a_bare_host_entry_does_not_open_a_non_default_port(servers: dict[str, str]) -> None:
    outcome = ImageIntake(load_settings(allowed_hosts=["127.0.0.1"])).prepare(f"http://{servers['image']}/x.png")
    assert isinstance(outcome, IntakeFailure) and outcome.error.code == ErrorCode.FORBIDDEN_ADDRESS
    assert PngServer.seen == []


def test_an_ipv6_host_port_entry_matches(servers: dict[str, str]) -> None:
    if "v6" not in servers:
        pytest.skip("no IPv6 loopback here")
    intake = ImageIntake(load_settings(allowed_hosts=[servers["v6"]]))
    assert isinstance(intake.prepare(f"http://{servers['v6']}/x.png"), PreparedImage)
    refused = ImageIntake(load_settings()).prepare(f"http://{servers['v6']}/x.png")
    assert isinstance(refused, IntakeFailure) and refused.error.code == ErrorCode.FORBIDDEN_ADDRESS
