"""An HTTP proxy that sits between an SDK and a real server and injects scripted faults.

Rules are consumed in order, per operation (create, commit, release, extend, event, decide, get, list,
balances). Each rule is (op, action[, arg]):
  hold      forward, then keep the answer back for `arg` seconds (the client times out; the server applied it)
  drop      answer nothing for `arg` seconds without forwarding (a transport failure the client sees as timeout)
  status    answer `arg` = [status, body, headers] without forwarding
  after     forward, then answer `arg` = [status, body, headers] instead of the server's answer
  delay     wait `arg` seconds, then forward
  kill      forward, then call the proxy's `killer` (terminates the SDK process while its request is in flight)
  kill_first  call `killer` without forwarding
  gather    hold the request until `arg` requests of this op have arrived (at most 30 s), then forward them
            together (synchronizes independent workers' settlement attempts)
Every request is logged (op, idempotency key, body, status, fault, arrival time) and, for settlements, the
files of `journal_dir` at the moment the request arrived."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def op_of(method: str, path: str) -> str:
    if method == "GET":
        if path.startswith("/v1/balances"):
            return "balances"
        return "list" if path.rstrip("/") == "/v1/reservations" else "get"
    if path == "/v1/reservations":
        return "create"
    if path == "/v1/events":
        return "event"
    if path == "/v1/decide":
        return "decide"
    return path.rsplit("/", 1)[-1]


@dataclass
class Seen:
    op: str
    path: str
    key: str | None
    body: Any
    at_ms: int
    status: int | None = None
    fault: str | None = None
    journal: dict[str, str] | None = None


@dataclass
class FaultProxy:
    target: str
    rules: list[tuple] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    journal_dir: Path | None = None
    killer: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._gathered: dict[str, list] = {}
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "PATCH", "PUT", "DELETE"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> "FaultProxy":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fault proxy did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def reset(self, rules: list[tuple] | None = None, journal_dir: Path | None = None,
              killer: Callable[[], None] | None = None) -> None:
        with self._lock:
            self.rules = [tuple(r) for r in rules or []]
            self.seen = []
            self._gathered = {}
        self.journal_dir = journal_dir
        self.killer = killer

    def of(self, op: str) -> list[Seen]:
        return [s for s in self.seen if s.op == op]

    def ops(self) -> list[str]:
        return [s.op for s in self.seen]

    def _take(self, op: str) -> tuple | None:
        with self._lock:
            for i, rule in enumerate(self.rules):
                if rule[0] == op:
                    return self.rules.pop(i)
        return None

    def _snapshot(self) -> dict[str, str]:
        if self.journal_dir is None or not self.journal_dir.exists():
            return {}
        return {str(p.relative_to(self.journal_dir)): p.read_text(errors="replace")
                for p in self.journal_dir.rglob("*") if p.is_file()}

    async def _handle(self, request: Request) -> Response:
        content = await request.body()
        try:
            body = json.loads(content) if content else None
        except ValueError:
            body = None
        op = op_of(request.method, request.url.path)
        key = request.headers.get("x-idempotency-key") or (body.get("idempotency_key") if isinstance(body, dict)
                                                              else None)
        seen = Seen(op, request.url.path, key, body, int(time.time() * 1000))
        if op in ("commit", "event"):
            seen.journal = self._snapshot()
        with self._lock:
            self.seen.append(seen)
        rule = self._take(op)
        action, arg = (rule[1], rule[2] if len(rule) > 2 else None) if rule else (None, None)
        seen.fault = action
        if action == "drop":
            await asyncio.sleep(arg or 5)
            return Response(b"", 504)
        if action == "status":
            seen.status = arg[0]
            return _canned(arg)
        if action == "kill_first":
            self._kill()
            await asyncio.sleep(5)
            return Response(b"", 504)
        if action == "delay":
            await asyncio.sleep(arg)
        if action == "gather":
            waiting = self._gathered.setdefault(op, [])
            waiting.append(seen)
            deadline = time.monotonic() + 30
            while len(waiting) < arg and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with httpx.AsyncClient(base_url=self.target, timeout=30) as c:
            resp = await c.request(request.method, request.url.path, params=request.query_params, headers=headers,
                                   content=content)
        seen.status = resp.status_code
        if action == "kill":
            self._kill()
            await asyncio.sleep(5)
        if action == "hold":
            await asyncio.sleep(arg or 5)
        if action == "after":
            return _canned(arg)
        hop = {"content-length", "transfer-encoding", "connection", "content-encoding"}
        return Response(resp.content, resp.status_code, {k: v for k, v in resp.headers.items() if k.lower() not in hop})

    def _kill(self) -> None:
        if self.killer is not None:
            self.killer()


def _canned(spec: list | tuple) -> Response:
    status, body, headers = (list(spec) + [None, None])[:3]
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode() if body is not None else b""
    return Response(content, status, headers or {"content-type": "application/json"})
