"""Connection limits of `cycles serve`: a cap on open connections, idle/header/body timeouts and a cap on
the size and number of request headers.

uvicorn alone keeps a connection that never sends a request (or sends half a header) open forever,
buffers headers of any size and counts `limit_concurrency` only once a request's headers are complete,
so idle sockets can take every file descriptor. `protocol_class` returns a small subclass of uvicorn's
httptools protocol that adds these limits. What it adds per request is a few attribute writes: the
deadlines are read against a clock that one timer per worker advances, and that timer (not one timer
per request) closes the connections whose deadline passed.
"""

from __future__ import annotations

import logging
import math
import resource
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("cycles.server")

INF = math.inf
FD_RESERVE_MIN = 64  # descriptors kept for the store, the webhook sender, logs and the listener


@dataclass(frozen=True)
class Limits:
    max_connections: int = 1000  # per worker process
    # idle, before the first request and between requests; above the 5 s pool expiry of httpx (the published
    # SDKs' client) and undici, so a client never picks a pooled connection the server is closing
    timeout_keep_alive: float = 20.0
    timeout_header: float = 10.0  # from a request's first byte to the end of its headers
    timeout_body: float = 30.0  # from the end of the headers to the end of the body
    max_header_bytes: int = 32 * 1024  # request line and headers
    max_headers: int = 100

    def check(self) -> None:
        for name in ("max_connections", "max_header_bytes", "max_headers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1")
        for name in ("timeout_keep_alive", "timeout_header", "timeout_body"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be more than 0 seconds")


def fd_budget(max_connections: int) -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one, then return (connections allowed, soft limit):
    the cap never lets connections take the descriptors the server itself needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    reserve = min(256, max(FD_RESERVE_MIN, soft // 8))
    return max(1, min(max_connections, soft - reserve)), soft


class _Sweeper:
    """One per worker: advances the coarse clock the connections read, and closes the overdue ones."""

    def __init__(self, loop: Any, connections: set, interval: float) -> None:
        self.loop, self.connections, self.interval = loop, connections, interval
        self.now = loop.time()
        self.counts = {"refused": 0, "evicted": 0, "timed_out": 0, "too_large": 0}
        self._logged = dict(self.counts)
        self._last_log = self.now
        loop.call_later(interval, self.tick)

    def tick(self) -> None:
        self.loop.call_later(self.interval, self.tick)  # first: a failure below must not stop the timeouts
        self.now = now = self.loop.time()
        for conn in [c for c in self.connections if getattr(c, "_deadline", INF) <= now]:
            conn._expire()
        if now - self._last_log >= 10 and self.counts != self._logged:
            # one summary line at most every 10 s: an attack must not flood the log
            log.warning("connection limits: %s", ", ".join(f"{k} {v - self._logged[k]}" for k, v in self.counts.items()
                                                           if v != self._logged[k]))
            self._logged, self._last_log = dict(self.counts), now


def _plain(status: bytes, text: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: "
            + str(len(text)).encode() + b"\r\nconnection: close\r\n" + extra + b"\r\n" + text)


_RESPONSES = {
    408: _plain(b"408 Request Timeout", b"Request header timeout"),
    431: _plain(b"431 Request Header Fields Too Large", b"Request header fields too large"),
    503: _plain(b"503 Service Unavailable", b"Too many open connections", b"retry-after: 1\r\n"),
}


class _HeadTooLarge(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    limits: Limits = Limits()
    max_connections: int = Limits.max_connections

    _deadline = INF
    _in_head = False
    _head_bytes = 0
    _refused = False

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        state = self.server_state
        sweeper = getattr(state, "_cycles_sweeper", None)
        if sweeper is None:
            tick = max(0.05, min(1.0, self.limits.timeout_header / 4, self.limits.timeout_body / 4,
                                 self.limits.timeout_keep_alive / 4))
            sweeper = state._cycles_sweeper = _Sweeper(self.loop, self.connections, tick)
        self._sweeper = sweeper
        if len(self.connections) >= self.max_connections and not self._evict_idle():
            sweeper.counts["refused"] += 1
            self._refused = True
            self.transport = transport
            transport.write(_RESPONSES[503])
            transport.close()
            return
        super().connection_made(transport)
        self._deadline = self.loop.time() + self.limits.timeout_keep_alive  # waiting for the first request

    def _evict_idle(self) -> bool:
        """At the cap, an idle connection (no request in progress) gives way to the new one: closing an
        idle keep-alive connection is ordinary HTTP, and it stops idle sockets from locking clients out."""
        for conn in self.connections:
            if getattr(conn, "_idle", lambda: False)():
                conn.transport.close()
                self.connections.discard(conn)
                self._sweeper.counts["evicted"] += 1
                return True
        return False

    def _idle(self) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        return (self.cycle is None and not self._in_head) or self.timeout_keep_alive_task is not None

    def _expire(self) -> None:
        self._deadline = INF
        if self.transport.is_closing():
            return
        self._sweeper.counts["timed_out"] += 1
        if self._in_head:
            self.transport.write(_RESPONSES[408])
        self.transport.close()

    def _refuse_head(self) -> None:
        self._sweeper.counts["too_large"] += 1
        self._deadline = INF
        self.transport.write(_RESPONSES[431])
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__cause__ or exc.__context__, _HeadTooLarge):
                self._refuse_head()
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._in_head:
            # httptools buffers a header until it is complete, so the bytes are counted here, per read:
            # the count may include the tail of the previous pipelined request, never less than the head.
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        self._deadline = self._sweeper.now + self.limits.timeout_header

    def on_headers_complete(self) -> None:
        self._in_head = False
        if len(self.headers) > self.limits.max_headers:  # their bytes were bounded by max_header_bytes
            raise _HeadTooLarge()
        self._deadline = self._sweeper.now + self.limits.timeout_body
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._deadline = INF  # the application's turn; after the response uvicorn's keep-alive timer runs
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = INF
        if self._refused:
            return
        super().connection_lost(exc)


def protocol_class(limits: Limits, max_connections: int) -> type[GuardedHttpToolsProtocol]:
    """A protocol class bound to these limits (uvicorn instantiates the class it is given)."""
    return type("CyclesHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": limits, "max_connections": max_connections})


def uvicorn_options(limits: Limits) -> dict[str, Any]:
    """uvicorn settings for one worker process: the guarded protocol and the keep-alive timeout."""
    cap, soft = fd_budget(limits.max_connections)
    if cap < limits.max_connections:
        log.warning("max connections lowered from %d to %d: the descriptor limit is %d", limits.max_connections,
                    cap, soft)
    return {"http": protocol_class(limits, cap), "timeout_keep_alive": limits.timeout_keep_alive,
            "h11_max_incomplete_event_size": limits.max_header_bytes}
