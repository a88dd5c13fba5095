"""A recording reverse proxy on 127.0.0.1 that sits between the published SDK and our server.

Every request is forwarded to the upstream server with httpx; method, path, query, request headers
and body, response status, headers and body are recorded so tests can assert call counts, keys and
wire shapes, and so every response the SDK saw can be checked with the SDK's own validators.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

# Headers that belong to one hop and must not be copied across the proxy.
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "content-encoding",
}


def _json_or_none(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


@dataclass
class Exchange:
    seq: int
    method: str
    path: str
    query: dict[str, list[str]]
    request_headers: dict[str, str]
    request_text: str
    request_json: Any
    status: int
    response_headers: dict[str, str]
    response_text: str
    response_json: Any
    started: float
    finished: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __repr__(self) -> str:
        return f"<Exchange #{self.seq} {self.method} {self.path} -> {self.status}>"

    @property
    def idempotency_key(self) -> str | None:
        body = self.request_json
        return body.get("idempotency_key") if isinstance(body, dict) else None

    @property
    def error(self) -> str | None:
        body = self.response_json
        return body.get("error") if isinstance(body, dict) and self.status >= 400 else None


class RecordingProxy:
    """Threaded HTTP/1.1 reverse proxy with keep-alive; one instance per test."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._exchanges: list[Exchange] = []
        # keepalive_expiry below the server's 5 s idle timeout: a pooled connection the server is
        # closing is never reused (under load that race answered a commit 502 "Server disconnected").
        self._client = httpx.Client(
            base_url=self.upstream, timeout=60, trust_env=False,
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=256, keepalive_expiry=1.0),
        )
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def log_message(self, fmt: str, *args: Any) -> None:  # keep test output clean
                pass

            def _forward(self) -> None:
                proxy._handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _forward

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 1024

        self._httpd = Server(("127.0.0.1", 0), Handler)
        host, port = self._httpd.server_address[:2]
        self.base_url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="recording-proxy", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "RecordingProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._client.close()

    def __enter__(self) -> "RecordingProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- forwarding ------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        seq = next(self._seq)
        started = time.time()
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in h.headers.items()}
        forward_headers = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP}
        try:
            resp = self._client.request(h.command, h.path, content=raw, headers=forward_headers)
            status, content = resp.status_code, resp.content
            resp_headers = {k.lower(): v for k, v in resp.headers.items()}
        except httpx.HTTPError as exc:  # upstream unreachable: answer 502 and record it
            status, content = 502, json.dumps({"proxy_error": str(exc)}).encode()
            resp_headers = {"content-type": "application/json"}
        finished = time.time()
        split = urlsplit(h.path)
        ex = Exchange(
            seq=seq, method=h.command, path=split.path, query=parse_qs(split.query),
            request_headers=headers, request_text=raw.decode("utf-8", "replace"), request_json=_json_or_none(raw),
            status=status, response_headers=resp_headers, response_text=content.decode("utf-8", "replace"),
            response_json=_json_or_none(content), started=started, finished=finished,
        )
        with self._lock:
            self._exchanges.append(ex)
        h.send_response_only(status)
        for k, v in resp_headers.items():
            if k not in _HOP_BY_HOP:
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(content)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(content)

    # -- queries ---------------------------------------------------------------------------------

    @property
    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return sorted(self._exchanges, key=lambda e: e.seq)

    def calls(self, method: str | None = None, suffix: str | None = None, path: str | None = None) -> list[Exchange]:
        """Recorded exchanges filtered by method and by exact path or path suffix (e.g. '/commit')."""
        out = []
        for ex in self.exchanges:
            if method is not None and ex.method != method:
                continue
            if path is not None and ex.path != path:
                continue
            if suffix is not None and not ex.path.endswith(suffix):
                continue
            out.append(ex)
        return out

    def summary(self) -> list[tuple[str, str, int]]:
        """(method, normalised path, status) per exchange; reservation ids replaced by '{id}'."""
        out = []
        for ex in self.exchanges:
            parts = ex.path.split("/")
            if len(parts) >= 4 and parts[1:3] == ["v1", "reservations"]:
                parts[3] = "{id}"
            out.append((ex.method, "/".join(parts), ex.status))
        return out

    def dump(self) -> list[dict[str, Any]]:
        return [ex.to_dict() for ex in self.exchanges]
