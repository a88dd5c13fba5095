"""The direct HTTP/1.1 path of the hot routes: reserve, commit, release, extend, decide and events answered
from the connection's protocol, without uvicorn's per-request ASGI machinery.

uvicorn's httptools protocol still parses every request (the same parser, limits and timeouts:
connections.GuardedHttpToolsProtocol). When a request's head is complete and it is a plain POST to a hot
route (server.hotpath.HotRoutes.match) whose small body has a Content-Length, its body is collected and the
route's wrapped endpoint (the one Starlette and HotRoutes serve: the same correlation ids, errors, journal
and metrics) is called with a DirectRequest; its answer goes out in one socket write, with uvicorn's
default headers (server, date) first and `connection: close` when the connection ends, as uvicorn writes it.
This spares the ASGI scope, the request-response cycle and its event, the receive/send messages, the proxy
headers middleware pass and a second write per request.

Everything else takes uvicorn's path unchanged: other methods and routes, HTTP/1.0, upgrades, `Expect:
100-continue`, chunked or large bodies, a query string or an escaped path, X-Forwarded-* headers (uvicorn's
proxy headers middleware decides what they mean), a request pipelined behind one still in progress, and any
server whose access log is on (uvicorn writes it) or that limits concurrency (uvicorn answers 503).
"""

from __future__ import annotations

from typing import Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HEADER_VALUE_RE, STATUS_LINE

from .connections import INF, GuardedHttpToolsProtocol
from .hotpath import DirectRequest, HotRoutes
from .http import MAX_BODY_BYTES

_500 = (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"), (b"connection", b"close")
_UNSET = object()
# uvicorn's default headers (server, date) as one block of bytes, checked and joined once per list: uvicorn
# builds a new list when the date changes (once a second), so the list itself is the cache key
_HEAD: tuple[Any, bool, bool, bytes] = (None, False, False, b"")


def _closes(value: bytes) -> bool:
    return b"close" in [t.lower().strip() for t in value.split(b",")]


def _default_head(default: list[tuple[bytes, bytes]]) -> tuple[Any, bool, bool, bytes]:
    """(the list, whether a value is invalid, whether it closes the connection, the joined header lines)."""
    invalid = any(HEADER_VALUE_RE.search(value) for _, value in default)
    close = any(name == b"connection" and _closes(value) for name, value in default)
    global _HEAD
    _HEAD = default, invalid, close, b"".join(b"%s: %s\r\n" % (name, value) for name, value in default)
    return _HEAD


class _NoEvent:
    """uvicorn's protocol sets its cycle's event on a lost connection; the direct path waits on none."""

    @staticmethod
    def set() -> None:
        return None


class _Cycle:
    """The request in flight on the direct path, with what uvicorn's protocol reads of its own cycles
    (connection_lost, shutdown, pipelining, the idle test of GuardedHttpToolsProtocol)."""

    __slots__ = ("response_complete", "disconnected", "keep_alive", "body", "more_body", "endpoint", "params",
                 "headers")
    message_event = _NoEvent

    def __init__(self, keep_alive: bool, endpoint: Any, params: dict[str, str], headers: dict[str, str]) -> None:
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.more_body = True
        self.endpoint, self.params, self.headers = endpoint, params, headers


def _hot_routes(app: Any) -> HotRoutes | None:
    """The HotRoutes app uvicorn serves, directly or behind its proxy headers middleware only."""
    if isinstance(app, ProxyHeadersMiddleware):
        app = app.app
    return app if isinstance(app, HotRoutes) else None


class LeanHttpProtocol(GuardedHttpToolsProtocol):
    def _direct(self) -> bool:
        hot = getattr(self.server_state, "_cycles_hot", _UNSET)
        if hot is _UNSET:
            hot = self.server_state._cycles_hot = _hot_routes(self.app)
        if hot is None or self.access_log or self.limit_concurrency is not None:  # uvicorn's 503 decides there
            return False
        parser = self.parser
        if (parser.get_method() != b"POST" or parser.get_http_version() != "1.1" or self.expect_100_continue
                or parser.should_upgrade() or (self.cycle is not None and not self.cycle.response_complete)):
            return False
        url = self.url
        if url[:1] != b"/" or b"?" in url or b"%" in url or b"#" in url:
            return False
        try:
            found = hot.match(url.decode("ascii"))
        except UnicodeDecodeError:
            return False
        if found is None:
            return False
        headers: dict[str, str] = {}
        for name, value in self.headers:
            key = name.decode("latin-1")
            if key not in headers:
                headers[key] = value.decode("latin-1")
        length = headers.get("content-length")
        if (length is None or not length.isdigit() or int(length) > MAX_BODY_BYTES or "transfer-encoding" in headers
                or "x-forwarded-for" in headers or "x-forwarded-proto" in headers):
            return False
        self.cycle = _Cycle(parser.should_keep_alive(), found[0], found[1], headers)  # type: ignore[assignment]
        return True

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is _Cycle:
            cycle.body += body  # at most MAX_BODY_BYTES: the parser holds the body to its Content-Length
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if type(cycle) is _Cycle and cycle.more_body:
            self._deadline = INF
            cycle.more_body = False
            request = DirectRequest(cycle.headers, cycle.params, self.client, self.server_state._cycles_hot.app,
                                    bytes(cycle.body))
            task = self.loop.create_task(self._respond(cycle, request))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)
            return
        super().on_message_complete()

    async def _respond(self, cycle: _Cycle, request: DirectRequest) -> None:
        try:
            response = await cycle.endpoint(request)
            status, headers, body = response.status_code, response.raw_headers, response.body
        except BaseException as exc:  # noqa: BLE001 - as uvicorn answers an application that raised
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            status, headers, body = 500, _500, b"Internal Server Error"
        if self.flow.write_paused and not cycle.disconnected:
            await self.flow.drain()
        if cycle.disconnected:
            return
        default = self.server_state.default_headers
        head = _HEAD
        if head[0] is not default:
            head = _default_head(default)
        # one pass over this response's own headers: the values joined by a tab (allowed in a value, so only a
        # forbidden byte inside a value matches), the connection header looked for by name
        values = b"\t".join([value for _, value in headers])
        if head[1] or HEADER_VALUE_RE.search(values):  # uvicorn refuses to send it and drops the connection
            self.logger.error("Exception in ASGI application\n", exc_info=RuntimeError("Invalid HTTP header value."))
            self.transport.close()
            return
        close = head[2]
        content = [STATUS_LINE[status], head[3]]
        for name, value in headers:
            if name == b"connection" and _closes(value):
                close = True
            content += (name, b": ", value, b"\r\n")
        if close:
            cycle.keep_alive = False
        elif not cycle.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", body)
        self.transport.write(b"".join(content))
        cycle.response_complete = True
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()
