"""An httpx transport that records every request and injects scripted faults IN FRONT OF the real
server (no mock of the server: a forwarded request really reaches it).

Rules are consumed in order per operation. Each rule is (op, action[, arg]):
  op:     create | commit | release | extend | event | decide | get | list | balances
  action: lose_response  forward, then raise ReadTimeout (the server applied it, the client never sees it)
          connect_error  raise ConnectError without forwarding
          status         answer `arg` = (status, body_bytes, headers) without forwarding
          after          forward, then replace the answer with `arg` = (status, body, headers)
          die_before     os._exit(`arg` or 137) without forwarding (process killed before the send)
          die_after      forward, then os._exit(`arg` or 137) (killed while the request is in flight)
          hook           call `arg(request)` then forward
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx

from cycles.conformance.faultproxy import op_of as op_name


def op_of(request: httpx.Request) -> str:
    return op_name(request.method, request.url.path)


@dataclass
class Seen:
    op: str
    path: str
    key: str | None
    body: dict[str, Any] | None
    status: int | None = None
    fault: str | None = None


@dataclass
class Script:
    rules: list[tuple] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, op: str) -> tuple | None:
        with self.lock:
            for i, rule in enumerate(self.rules):
                if rule[0] == op:
                    return self.rules.pop(i)
        return None

    def ops(self) -> list[str]:
        return [s.op for s in self.seen]

    def ops_once(self) -> list[str]:
        """ops() with a create or commit repeated back to back (the client retrying it with the same key after a
        short read timeout, as happens on a loaded machine) counted once."""
        out: list[str] = []
        for s in self.seen:
            if not (out and s.op == out[-1] and s.op in ("create", "commit")):
                out.append(s.op)
        return out

    def of(self, op: str) -> list[Seen]:
        return [s for s in self.seen if s.op == op]


def _seen(request: httpx.Request, content: bytes) -> Seen:
    body = None
    if content:
        try:
            body = json.loads(content)
        except ValueError:
            body = None
    key = request.headers.get("x-idempotency-key")
    return Seen(op_of(request), request.url.path, key, body)


def _canned(request: httpx.Request, spec: tuple) -> httpx.Response:
    status, body, headers = (list(spec) + [None, None])[:3]
    content = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    return httpx.Response(status, content=content, headers=headers or {"content-type": "application/json"},
                          request=request)


class FaultTransport(httpx.BaseTransport):
    def __init__(self, script: Script | None = None, inner: httpx.BaseTransport | None = None) -> None:
        self.script = script or Script()
        self.inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        content = request.read()
        seen = _seen(request, content)
        with self.script.lock:
            self.script.seen.append(seen)
        rule = self.script.take(seen.op)
        action = rule[1] if rule else None
        arg = rule[2] if rule and len(rule) > 2 else None
        seen.fault = action
        if action == "connect_error":
            raise httpx.ConnectError("injected connect error", request=request)
        if action == "status":
            seen.status = arg[0]
            return _canned(request, arg)
        if action == "die_before":
            os._exit(arg or 137)
        if action == "hook":
            arg(request)
        resp = self.inner.handle_request(request)
        resp.read()
        seen.status = resp.status_code
        if action == "lose_response":
            raise httpx.ReadTimeout("injected: response lost", request=request)
        if action == "die_after":
            os._exit(arg or 137)
        if action == "after":
            return _canned(request, arg)
        return resp


class AsyncFaultTransport(httpx.AsyncBaseTransport):
    def __init__(self, script: Script | None = None, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.script = script or Script()
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        content = await request.aread()
        seen = _seen(request, content)
        with self.script.lock:
            self.script.seen.append(seen)
        rule = self.script.take(seen.op)
        action = rule[1] if rule else None
        arg = rule[2] if rule and len(rule) > 2 else None
        seen.fault = action
        if action == "connect_error":
            raise httpx.ConnectError("injected connect error", request=request)
        if action == "status":
            seen.status = arg[0]
            return _canned(request, arg)
        if action == "hook":
            arg(request)
        resp = await self.inner.handle_async_request(request)
        await resp.aread()
        seen.status = resp.status_code
        if action == "lose_response":
            raise httpx.ReadTimeout("injected: response lost", request=request)
        if action == "after":
            return _canned(request, arg)
        return resp
