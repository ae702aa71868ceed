"""A whole-fetch deadline that covers connect, TLS, the status line, every header byte and the body.

httpx's timeouts are per operation: a server that sends one header byte per second never trips a
5 s read timeout, and a check in our body loop only runs once the headers are complete. So the
deadline lives below HTTP, in the network backend: every connect, read and write on the socket
gets at most the time left until the fetch's deadline, and none at all once it has passed. No
sequence of slow-but-alive answers can hold a fetch past it.

The deadline is per thread (a ContextVar, set by `within`); intake threads each run one fetch.
Name resolution is under it too (`resolve_within`): getaddrinfo has no timeout of its own, so it
runs in a helper thread that the fetch waits on for the time left, no longer.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
import threading
import time
import typing
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import httpcore
import httpx

_DEADLINE: ContextVar[float | None] = ContextVar("skutag_fetch_deadline", default=None)

# socket.getaddrinfo's shape, as the fetcher calls it: (host, port, type=...) -> address infos.
Resolver = Callable[..., list[tuple[typing.Any, ...]]]
# Lookups the deadline gave up on may still hang in their threads until the system resolver's own
# timeout: at most this many at once, so a dead DNS server cannot pile up threads without bound.
_LOOKUP_SLOTS = threading.BoundedSemaphore(64)


@contextlib.contextmanager
def within(seconds: float) -> Iterator[float]:
    """Every socket operation inside the block ends by time.monotonic() + seconds."""
    deadline = time.monotonic() + seconds
    token = _DEADLINE.set(deadline)
    try:
        yield deadline
    finally:
        _DEADLINE.reset(token)


def bounded(timeout: float | None, error: type[Exception]) -> float | None:
    """The operation's own timeout, cut to what is left of the deadline; raises error when none is."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the fetch deadline has passed")
    return left if timeout is None else min(timeout, left)


class DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self.inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        timeout = bounded(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self.inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self.inner.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend | None = None) -> None:
        self.inner = inner or httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = bounded(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self.inner.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = bounded(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self.inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        left = bounded(None, httpcore.PoolTimeout)
        self.inner.sleep(seconds if left is None else min(seconds, left))


def deadline_client(proxy: str | None = None) -> httpx.Client:
    """An httpx client whose sockets obey `within`. No proxies from the environment (they would
    connect to hosts we never checked; pipeline.stores.Proxies chooses one explicitly, given as
    proxy, and the request still names the checked address) and no automatic redirects (each hop
    is checked)."""
    transport = httpx.HTTPTransport(trust_env=False, proxy=proxy)
    pool = transport._pool  # httpx builds its pool privately; tests/test_fetch_safety.py guards this
    pool._network_backend = DeadlineBackend(pool._network_backend)
    return httpx.Client(transport=transport, trust_env=False, follow_redirects=False)


def remaining(default: float = math.inf) -> float:
    """Seconds left of the current deadline (default when there is none)."""
    deadline = _DEADLINE.get()
    return default if deadline is None else deadline - time.monotonic()


def resolve_within(host: str, port: int, resolver: Resolver = socket.getaddrinfo) -> list[tuple[typing.Any, ...]]:
    """resolver(host, port), answered within the current deadline or TimeoutError. Without a
    deadline it runs here, as before. The lookup's own errors (socket.gaierror) are re-raised."""
    left = remaining()
    if math.isinf(left):
        return resolver(host, port, type=socket.SOCK_STREAM)
    if left <= 0 or not _LOOKUP_SLOTS.acquire(timeout=left):
        raise TimeoutError(f"no time left to resolve {host!r}")
    lookup = _Lookup(resolver, host, port)
    threading.Thread(target=lookup.run, name="skutag-resolve", daemon=True).start()
    if not lookup.done.wait(max(remaining(), 0.0)):
        raise TimeoutError(f"resolving {host!r} took longer than the fetch deadline")
    if lookup.error is not None:
        raise lookup.error
    return lookup.infos


class _Lookup:
    """One getaddrinfo in a daemon thread (a hung one never holds the process at exit)."""

    def __init__(self, resolver: Resolver, host: str, port: int) -> None:
        self.resolver, self.host, self.port = resolver, host, port
        self.done = threading.Event()
        self.infos: list[tuple[typing.Any, ...]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.infos = self.resolver(self.host, self.port, type=socket.SOCK_STREAM)
        except BaseException as exc:  # handed to the waiting fetch, which decides
            self.error = exc
        finally:
            _LOOKUP_SLOTS.release()
            self.done.set()
