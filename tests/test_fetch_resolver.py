"""Name resolution is under the whole-fetch deadline: a DNS server that never answers costs a fetch
its deadline, not the system resolver's own timeouts. Resolver stubs only: nothing here asks DNS."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from pipeline.images import Fetcher, FetchPolicy, IntakeError
from pipeline.settings import load_settings
from schemas.results import ErrorCode


class PngServer(BaseHTTPRequestHandler):
    body = b""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


@pytest.fixture
def loopback_port() -> Iterator[int]:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, "PNG")
    PngServer.body = buffer.getvalue()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), PngServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield int(httpd.server_address[1])
    httpd.shutdown()
    httpd.server_close()


def fetcher(resolver: Any, **settings: Any) -> Fetcher:
    return Fetcher(FetchPolicy.from_settings(load_settings(**settings)), resolver=resolver)


def test_a_resolver_that_never_answers_is_cut_off_at_the_deadline() -> None:
    release = threading.Event()

    def hanging(host: str, port: int, **kwargs: Any) -> list[Any]:
        release.wait(30)  # a DNS server that does not answer
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    slow = fetcher(hanging, fetch_total_timeout_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(IntakeError) as caught:
            slow.fetch("http://images.example/a.png")
    finally:
        release.set()
        slow.close()
    assert caught.value.item_error.code == ErrorCode.TIMEOUT
    assert "images.example" in caught.value.item_error.message
    assert time.monotonic() - started < 2.0


def test_the_resolver_answer_is_used_and_its_failure_is_per_item(loopback_port: int) -> None:
    def to_loopback(host: str, port: int, **kwargs: Any) -> list[Any]:
        if host != "images.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    fast = fetcher(to_loopback, allowed_hosts=[f"images.example:{loopback_port}"], fetch_total_timeout_s=5)
    try:
        fetched = fast.fetch(f"http://images.example:{loopback_port}/a.png")
        assert fetched.data == PngServer.body
        with pytest.raises(IntakeError) as caught:
            fast.fetch("http://missing.example/a.png")
    finally:
        fast.close()
    assert caught.value.item_error.code == ErrorCode.FETCH_FAILED
