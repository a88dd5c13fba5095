"""Sending one webhook delivery: the pinned HTTP request (Sender), its headers and signatures, and how
a response is classified (success, retried, failed at once; Retry-After). The worker that claims,
retries and records deliveries is cycles.webhooks.deliver."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from .. import __version__
from . import signing, urlpolicy
from .subscriptions import header_problem, header_values, signing_secrets

log = logging.getLogger("cycles.webhooks")

NOT_RETRIED_4XX = frozenset({408, 409, 425, 429})
RETRY_AFTER_STATUSES = frozenset({429, 503})
MAX_RETRY_AFTER_MS = 3_600_000
RESOLVE_TIMEOUT_S = 5.0
USER_AGENT = f"cycles-webhooks/{__version__}"


def _now_s() -> int:
    return int(time.time())


# ---- one HTTP attempt ----

@dataclass
class Result:
    outcome: str  # success | http_3xx | http_4xx | http_5xx | timeout | transport_error | refused
    status: int | None = None
    duration_ms: int = 0
    error: str | None = None
    retryable: bool = True
    retry_after_ms: int | None = None
    sent: bool = True  # a request may have reached the endpoint

    @property
    def ok(self) -> bool:
        return self.outcome == "success"


def parse_retry_after(value: str | None, now_s: float | None = None) -> int | None:
    """Milliseconds to wait from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) * 1000
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now_s is None else now_s
    return max(0, int((when.timestamp() - current) * 1000))


def classify(status: int) -> tuple[str, bool]:
    if 200 <= status < 300:
        return "success", False
    if 400 <= status < 500:
        return "http_4xx", status in NOT_RETRIED_4XX
    if 300 <= status < 400:
        return "http_3xx", True
    return "http_5xx", True


def endpoint_key(url: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return parts.scheme, (parts.hostname or "").lower(), port
    except ValueError:
        return "", url, 0


class Sender:
    """HTTP with the connection pinned to checked addresses. One client (connection pool) per endpoint,
    so a connection verified for one name is never reused for another name on the same address."""

    def __init__(self, *, per_endpoint: int = 4, connect_timeout_s: float = 5.0, max_clients: int = 256) -> None:
        self.per_endpoint = per_endpoint
        self.connect_timeout_s = connect_timeout_s
        self.max_clients = max_clients
        self._clients: OrderedDict[tuple[str, str, int], httpx.AsyncClient] = OrderedDict()

    def _client(self, key: tuple[str, str, int]) -> httpx.AsyncClient:
        client = self._clients.get(key)
        if client is not None:
            self._clients.move_to_end(key)
            return client
        client = httpx.AsyncClient(
            http1=True, http2=False, follow_redirects=False, trust_env=False,
            timeout=httpx.Timeout(None, connect=self.connect_timeout_s),
            limits=httpx.Limits(max_connections=self.per_endpoint, max_keepalive_connections=self.per_endpoint,
                                keepalive_expiry=30.0))
        self._clients[key] = client
        while len(self._clients) > self.max_clients:
            _, old = self._clients.popitem(last=False)
            asyncio.get_running_loop().create_task(old.aclose())
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), OrderedDict()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def post(self, url: str, policy: urlpolicy.UrlPolicy, body: bytes, headers: httpx.Headers,
                   timeout_s: float) -> Result:
        """Resolve, check and POST; `timeout_s` bounds the whole of it (name lookup included)."""
        started = time.perf_counter()

        def took() -> int:
            return int((time.perf_counter() - started) * 1000)

        try:
            target = await asyncio.wait_for(asyncio.to_thread(urlpolicy.resolve, url, policy),
                                            max(0.001, min(RESOLVE_TIMEOUT_S, timeout_s)))
        except urlpolicy.UrlRejected as exc:
            text = str(exc)
            if "does not resolve" in text or "has no address" in text:
                return Result("transport_error", error=f"url host did not resolve: {text}", duration_ms=took(),
                              sent=False)
            return Result("refused", error=f"refused at send time by the webhook security config: {text}",
                          retryable=False, duration_ms=took(), sent=False)
        except asyncio.TimeoutError:
            return Result("transport_error", error="url host did not resolve in time", duration_ms=took(), sent=False)
        except (ValueError, OSError) as exc:
            return Result("transport_error", error=f"url host did not resolve: {exc}", duration_ms=took(), sent=False)

        parts = urlsplit(url)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        default_port = 443 if target.scheme == "https" else 80
        name = f"[{target.host}]" if ":" in target.host else target.host
        host_header = name if target.port == default_port else f"{name}:{target.port}"
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        client = self._client((target.scheme, target.host, target.port))
        last_error = "no address"
        for address in target.addresses:
            literal = f"[{address}]" if ":" in address else address
            request = client.build_request(
                "POST", f"{target.scheme}://{literal}:{target.port}{path}", content=body,
                headers=httpx.Headers({**dict(headers.multi_items()), "Host": host_header}), extensions=extensions)
            try:
                async with asyncio.timeout(max(0.001, timeout_s - (time.perf_counter() - started))):
                    response = await client.send(request, stream=True)
                    try:
                        read = 0
                        async for chunk in response.aiter_raw():  # drain a little (keep-alive), ignore the rest
                            read += len(chunk)
                            if read >= 16_384:
                                break
                    finally:
                        await response.aclose()
            except httpx.ConnectError as exc:
                last_error = f"connection to {target.host} ({address}) failed: {exc or type(exc).__name__}"
                continue  # another checked address of the same name
            except (TimeoutError, httpx.TimeoutException):
                return Result("timeout", error=f"no response within {timeout_s:.1f}s", duration_ms=took())
            except httpx.HTTPError as exc:
                return Result("transport_error", error=f"{type(exc).__name__}: {exc}"[:500], duration_ms=took())
            outcome, retryable = classify(response.status_code)
            retry_after = None
            if response.status_code in RETRY_AFTER_STATUSES:
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            error = None if outcome == "success" else f"HTTP {response.status_code}"
            return Result(outcome, status=response.status_code, duration_ms=took(), error=error,
                          retryable=retryable, retry_after_ms=retry_after)
        return Result("transport_error", error=last_error[:500], duration_ms=took(), sent=False)


class SealedUnreadable(ValueError):
    pass


class HeaderUnusable(ValueError):
    pass


def traceparent(trace_id: str, flags: str = "01") -> str:
    span = os.urandom(8).hex()
    while span == "0" * 16:
        span = os.urandom(8).hex()
    return f"00-{trace_id}-{span}-{flags}"


def build_headers(sub: dict[str, Any], box: Any, body: bytes, *, delivery_id: str, event_id: str, event_type: str,
                  trace_id: str, trace_flags: str = "01", request_id: str | None = None,
                  now_ms: int | None = None) -> httpx.Headers:
    """Every header of one attempt: the subscription's custom headers (opened), then ours (they win),
    then the signatures over the exact body. Raises SealedUnreadable when a sealed value cannot be opened,
    HeaderUnusable when a stored custom header cannot be sent."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    try:
        custom = header_values(sub, box) if sub.get("headers") else {}
        secrets = signing_secrets(sub, box, now_ms)
    except Exception as exc:  # noqa: BLE001 - a value sealed under another key (or damaged)
        raise SealedUnreadable("the subscription's signing secret or headers cannot be opened with this "
                               "server's CYCLES_WEBHOOK_SECRET_KEY") from exc
    for name, value in custom.items():  # stored before header values were validated on write
        problem = header_problem(name, value)
        if problem:
            raise HeaderUnusable(f"the subscription's custom headers cannot be sent: {problem}; "
                                 "replace them with a PATCH of headers")
    headers = httpx.Headers(custom)
    ours = {
        "Content-Type": "application/json", "User-Agent": USER_AGENT,
        "X-Cycles-Event-Id": event_id, "X-Cycles-Event-Type": event_type, "X-Cycles-Delivery-Id": delivery_id,
        "X-Cycles-Trace-Id": trace_id, "traceparent": traceparent(trace_id, trace_flags),
    }
    if request_id:
        ours["X-Request-Id"] = request_id
    ours.update(signing.sign_headers(body, secrets, delivery_id, _now_s()))
    for name, value in ours.items():
        headers[name] = value
    return headers


def open_box(box: Any) -> Any:
    if box is not None:
        return box
    from .crypto import SecretBox

    return SecretBox(None)  # opens values stored in plaintext only
