"""One pipelined connection for the store's script calls: the cheapest path from a request to Redis.

Every store operation is one EVALSHA. redis-py spends more CPU per call than the script spends in Redis
(a pool checkout, a timeout scope, command packing through several layers). Here concurrent calls are
written back to back on one socket and their replies matched in order (Redis answers a connection's
commands in order), parsed by hiredis: no pool, no task and no timer per call. A single watchdog fails
the calls that waited longer than the socket timeout and drops the connection; the next call connects
again. Errors map as redis-py's do (connection trouble is OSError / redis ConnectionError, a script's
error reply is ResponseError), so callers handle both paths alike.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any

import hiredis
from redis import exceptions as rex
from redis.asyncio.connection import SSLConnection, parse_url


def _pack(*args: Any) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts += [b"$%d\r\n" % len(data), data, b"\r\n"]
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not self.waiting:  # a reply nobody waits for: the stream is out of step
                self.fail(rex.ConnectionError("unexpected reply from Redis"))
                return
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.fail(rex.ConnectionError(f"Connection to Redis lost: {exc or 'closed'}"))

    def fail(self, exc: BaseException) -> None:
        self.lost = self.lost or exc
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


_UNDERSTOOD = {"host", "port", "db", "username", "password", "connection_class", "path", "ssl_ca_certs",
               "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname", "ssl_ca_path"}


def supports(url: str) -> bool:
    """Whether this channel understands every option of `url` (else the store keeps using redis-py)."""
    try:
        return set(parse_url(url)) <= _UNDERSTOOD
    except ValueError:
        return False


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"), capath=options.get("ssl_ca_path"))
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    reqs = options.get("ssl_cert_reqs")
    if options.get("ssl_check_hostname") is False or reqs in ("none", "optional", ssl.CERT_NONE, ssl.CERT_OPTIONAL):
        context.check_hostname = False
    if reqs in ("none", ssl.CERT_NONE):
        context.verify_mode = ssl.CERT_NONE
    elif reqs in ("optional", ssl.CERT_OPTIONAL):
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class ScriptChannel:
    def __init__(self, url: str, *, connect_timeout_s: float, socket_timeout_s: float) -> None:
        options = parse_url(url)
        self.host = options.get("host", "localhost")
        self.port = int(options.get("port", 6379))
        self.path = options.get("path")  # unix:// URLs
        self.db = int(options.get("db", 0) or 0)
        self.username = options.get("username")
        self.password = options.get("password")
        self.tls = _tls_context(options) if options.get("connection_class") is SSLConnection else None
        self.connect_timeout_s = connect_timeout_s
        self.socket_timeout_s = socket_timeout_s
        self._proto: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    async def _connection(self) -> _Protocol:
        proto, loop = self._proto, asyncio.get_running_loop()
        if proto is not None and proto.lost is None and self._loop is loop:
            return proto
        if self._loop is not loop:  # a store used from a new event loop: the old connection belongs to the old one
            self._connecting, self._watchdog, self._loop = None, None, loop
        if self._connecting is None:  # concurrent callers share one connection attempt
            self._connecting = asyncio.get_running_loop().create_future()
            try:
                self._proto = await asyncio.wait_for(self._connect(), self.connect_timeout_s)
                self._connecting.set_result(self._proto)
            except BaseException as exc:
                error = exc if isinstance(exc, OSError) else rex.ConnectionError(f"Redis connect failed: {exc!r}")
                self._connecting.set_exception(error)
                self._connecting.exception()
                raise error from None
            finally:
                self._connecting = None
            return self._proto
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self.path:
            _, proto = await loop.create_unix_connection(_Protocol, self.path)
        else:
            _, proto = await loop.create_connection(_Protocol, self.host, self.port, ssl=self.tls,
                                                    server_hostname=self.host if self.tls else None)
        setup = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        for command in setup:
            reply = await self._send(proto, _pack(*command))
            if isinstance(reply, hiredis.ReplyError):
                proto.fail(rex.ConnectionError(f"Redis refused {command[0]}: {reply}"))
                raise rex.AuthenticationError(str(reply)) if command[0] == "AUTH" else rex.ResponseError(str(reply))
        return proto

    def _send(self, proto: _Protocol, payload: bytes) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        proto.waiting.append((future, time.monotonic()))
        assert proto.transport is not None
        proto.transport.write(payload)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self.socket_timeout_s / 2, self._watch)
        return future

    def _watch(self) -> None:
        """Fail every call of a connection whose oldest call waited past the socket timeout."""
        self._watchdog = None
        proto = self._proto
        if proto is None or not proto.waiting:
            return
        if time.monotonic() - proto.waiting[0][1] > self.socket_timeout_s:
            proto.fail(rex.TimeoutError("Timeout reading from Redis"))
            return
        self._watchdog = asyncio.get_running_loop().call_later(self.socket_timeout_s / 2, self._watch)

    async def evalsha(self, sha: str, source: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script once if Redis does not know it (a restart, a failover, SCRIPT FLUSH)."""
        for attempt in range(2):
            proto = await self._connection()
            reply = await self._send(proto, _pack("EVALSHA", sha, len(keys), *keys, *args))
            if not isinstance(reply, hiredis.ReplyError):
                return reply
            text = str(reply)
            if text.startswith("NOSCRIPT") and attempt == 0:
                loaded = await self._send(proto, _pack("SCRIPT", "LOAD", source))
                if isinstance(loaded, hiredis.ReplyError):
                    raise rex.ResponseError(str(loaded))
                continue
            if text.startswith("LOADING"):
                raise rex.BusyLoadingError(text)
            raise rex.ResponseError(text)
        raise rex.ResponseError("NOSCRIPT after SCRIPT LOAD")

    def close(self) -> None:
        watchdog, proto, self._watchdog, self._proto = self._watchdog, self._proto, None, None
        try:
            if watchdog is not None:
                watchdog.cancel()
            if proto is not None:
                proto.fail(rex.ConnectionError("closed"))
        except RuntimeError:
            pass  # opened on an event loop that has ended since: its connection went with it
