"""The core shared by the sync and async clients: request building, response parsing, retry policy.

It does no I/O. A call is a *plan*: a generator that yields `Send` (perform this HTTP request and send
back the `httpx.Response` or the `httpx.HTTPError`) and `Sleep` actions and finally returns a value or
raises a typed error. `sync.py` runs plans with blocking I/O, `aio.py` with asyncio, so both clients
share every decision (which statuses succeed, what is retried, how long to wait, which error class).
"""

from __future__ import annotations

import email.utils
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Generator, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from ..protocol import models as m
from . import errors as e
from .config import CyclesConfig

log = logging.getLogger("cycles.client")
T = TypeVar("T")
MAX_KEY = 256


@dataclass(slots=True)
class Prepared:
    method: str
    path: str
    op: str
    content: bytes | None = None
    params: dict[str, Any] | None = None
    idempotency_key: str | None = None
    expect_status: int = 200
    response_type: type | None = None
    retry_ambiguous: bool = True  # safe to resend (idempotent by key, or a read)


@dataclass(slots=True)
class Send:
    request: Prepared


@dataclass(slots=True)
class Sleep:
    seconds: float


@dataclass(slots=True)
class Meta:
    """What the transport observed for one attempt (used by the heartbeat for rtt)."""

    status: int
    request_id: str | None
    rtt_ms: float


Plan = Generator["Send | Sleep", Any, T]


# ---------------------------------------------------------------- encoding / decoding


def to_struct(obj: Any, typ: type[T]) -> T:
    """Accept a wire model, or a plain dict (validated into the model); reject anything else."""
    if isinstance(obj, typ):
        return obj
    if isinstance(obj, dict):
        try:
            return msgspec.convert(obj, typ)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid {typ.__name__}: {exc}") from None
    raise TypeError(f"expected {typ.__name__} or dict, got {type(obj).__name__}")


def derive_key(prefix: str, key: str) -> str:
    """`prefix-key`, or `prefix-sha256-<hex>` when that would exceed 256 characters (published scheme)."""
    import hashlib

    derived = f"{prefix}-{key}"
    if len(derived) <= MAX_KEY:
        return derived
    return f"{prefix}-sha256-{hashlib.sha256(key.encode()).hexdigest()}"


def new_key() -> str:
    return str(uuid.uuid4())


_strict_decoders: dict[type, msgspec.json.Decoder] = {}
_warned_extra: set[tuple[type, str]] = set()


def _strip_unknown(obj: Any, info: Any) -> Any:
    """Drop fields the wire models do not know (forward compatibility), recursively."""
    from msgspec import inspect as mi

    if isinstance(info, mi.StructType) and isinstance(obj, dict):
        known = {f.encode_name: f for f in info.fields}
        return {k: _strip_unknown(v, known[k].type) for k, v in obj.items() if k in known}
    if isinstance(info, (mi.ListType,)) and isinstance(obj, list):
        return [_strip_unknown(v, info.item_type) for v in obj]
    if isinstance(info, mi.UnionType):
        for t in info.types:
            if isinstance(t, mi.StructType) and isinstance(obj, dict):
                return _strip_unknown(obj, t)
            if isinstance(t, mi.ListType) and isinstance(obj, list):
                return _strip_unknown(obj, t)
    if isinstance(info, mi.DictType) and isinstance(obj, dict):
        return {k: _strip_unknown(v, info.value_type) for k, v in obj.items()}
    return obj


def decode_response(content: bytes, typ: type[T]) -> T:
    """Strict decode into the protocol model; unknown (newer) fields are tolerated and logged once."""
    dec = _strict_decoders.get(typ)
    if dec is None:
        dec = _strict_decoders[typ] = msgspec.json.Decoder(typ)
    try:
        return dec.decode(content)
    except msgspec.ValidationError as exc:
        if "unknown field" not in str(exc):
            raise
    from msgspec import inspect as mi

    raw = msgspec.json.decode(content)
    stripped = _strip_unknown(raw, mi.type_info(typ))
    key = (typ, str(sorted(set(raw) - set(stripped))) if isinstance(raw, dict) else "")
    if key not in _warned_extra:
        _warned_extra.add(key)
        log.info("ignoring response fields unknown to this SDK in %s: %s", typ.__name__, key[1])
    return msgspec.convert(stripped, typ)


# ---------------------------------------------------------------- interpreting a response


def retry_after_ms(resp: httpx.Response, body: dict | None = None) -> int | None:
    if body and isinstance(body.get("retry_after_ms"), int) and body["retry_after_ms"] >= 0:
        return int(body["retry_after_ms"])
    raw = resp.headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return min(int(raw), 10**9) * 1000
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0, int(when.timestamp() * 1000 - time.time() * 1000))


def error_from_response(resp: httpx.Response) -> e.CyclesProtocolError:
    body: dict[str, Any] | None = None
    try:
        parsed = msgspec.json.decode(resp.content) if resp.content else None
        body = parsed if isinstance(parsed, dict) else None
    except msgspec.DecodeError:
        body = None
    code = body.get("error") if body and isinstance(body.get("error"), str) else None
    message = (body.get("message") if body and isinstance(body.get("message"), str) else None) or resp.reason_phrase
    details = body.get("details") if body and isinstance(body.get("details"), dict) else None
    cls = e.error_for(code, resp.status_code)
    return cls(message or f"HTTP {resp.status_code}", status=resp.status_code, error_code=code,
               reason_code=(body or {}).get("reason_code") if isinstance((body or {}).get("reason_code"), str) else None,
               request_id=(body or {}).get("request_id") or resp.headers.get("x-request-id"),
               trace_id=(body or {}).get("trace_id") or resp.headers.get("x-cycles-trace-id"),
               details=details, retry_after_ms=retry_after_ms(resp, body))


def interpret(req: Prepared, resp: httpx.Response) -> Any:
    """The typed result of a response, or raise the typed error. Only the expected status with a
    schema-valid body is a success; any other 2xx raises InvalidResponseError (ambiguous)."""
    status = resp.status_code
    if 200 <= status < 300:
        if status != req.expect_status:
            raise e.InvalidResponseError(
                f"{req.op}: expected HTTP {req.expect_status}, got {status}", status=status,
                request_id=resp.headers.get("x-request-id"))
        if req.response_type is None:
            return None
        try:
            return decode_response(resp.content, req.response_type)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise e.InvalidResponseError(f"{req.op}: response body is not a valid "
                                         f"{req.response_type.__name__}: {exc}", status=status,
                                         request_id=resp.headers.get("x-request-id")) from None
    raise error_from_response(resp)


def transport_error(req: Prepared, exc: BaseException) -> e.CyclesTransportError:
    return e.CyclesTransportError(f"{req.op}: {type(exc).__name__}: {exc}", cause=exc)


# ---------------------------------------------------------------- retry policy


@dataclass(slots=True)
class RetryPolicy:
    """Exponential backoff for transport errors, 429 (at least Retry-After) and 5xx. Never 409 or other 4xx.

    `max_wait` bounds a single Retry-After wait in a foreground call; a longer one is raised to the caller
    as RateLimitedError with `retry_after_ms` (the caller chooses).
    """

    max_attempts: int = 5
    initial: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 30.0
    max_wait: float = 30.0

    @classmethod
    def from_config(cls, cfg: CyclesConfig) -> "RetryPolicy":
        return cls(cfg.retry_max_attempts if cfg.retry_enabled else 1, cfg.retry_initial_delay,
                   cfg.retry_multiplier, cfg.retry_max_delay, cfg.retry_max_wait)

    def backoff(self, attempt: int) -> float:
        return min(self.initial * (self.multiplier ** attempt), self.max_delay)

    def delay_for(self, err: e.CyclesError, attempt: int, retry_ambiguous: bool) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to stop and raise."""
        if attempt + 1 >= self.max_attempts:
            return None
        if isinstance(err, e.CyclesTransportError) or isinstance(err, e.InvalidResponseError):
            return self.backoff(attempt) if retry_ambiguous else None
        if isinstance(err, e.CyclesProtocolError):
            if err.status == 429:
                wait = max(self.backoff(attempt), (err.retry_after_ms or 0) / 1000)
                return wait if wait <= self.max_wait else None
            if err.status >= 500:
                return self.backoff(attempt) if retry_ambiguous else None
        return None


NO_RETRY = RetryPolicy(max_attempts=1)


def call(req: Prepared, policy: RetryPolicy) -> Plan[Any]:
    """Send with retries; every attempt resends the identical body (same idempotency key)."""
    attempt = 0
    while True:
        outcome = yield Send(req)
        try:
            if isinstance(outcome, BaseException):
                raise transport_error(req, outcome)
            return interpret(req, outcome)
        except e.CyclesError as err:
            delay = policy.delay_for(err, attempt, req.retry_ambiguous)
            if delay is None:
                raise
            log.info("retrying %s (attempt %d) after %.3fs: %s", req.op, attempt + 2, delay, err)
            attempt += 1
            if delay > 0:
                yield Sleep(delay)


# ---------------------------------------------------------------- request builders


def _post(op: str, path: str, body: Any, key: str, typ: type, expect: int = 200) -> Prepared:
    return Prepared("POST", path, op, m.encode(body), None, key, expect, typ)


def _rid(reservation_id: str) -> str:
    if not reservation_id:
        raise ValueError("reservation_id is required")
    return quote(reservation_id, safe="")


def create_reservation(req: Any) -> Prepared:
    r = to_struct(req, m.ReservationCreateRequest)
    return _post("createReservation", "/v1/reservations", r, r.idempotency_key, m.ReservationCreateResponse)


def commit(reservation_id: str, req: Any) -> Prepared:
    r = to_struct(req, m.CommitRequest)
    return _post("commitReservation", f"/v1/reservations/{_rid(reservation_id)}/commit", r, r.idempotency_key,
                 m.CommitResponse)


def release(reservation_id: str, req: Any) -> Prepared:
    r = to_struct(req, m.ReleaseRequest)
    return _post("releaseReservation", f"/v1/reservations/{_rid(reservation_id)}/release", r, r.idempotency_key,
                 m.ReleaseResponse)


def extend(reservation_id: str, req: Any) -> Prepared:
    r = to_struct(req, m.ReservationExtendRequest)
    return _post("extendReservation", f"/v1/reservations/{_rid(reservation_id)}/extend", r, r.idempotency_key,
                 m.ReservationExtendResponse)


def decide(req: Any) -> Prepared:
    r = to_struct(req, m.DecisionRequest)
    return _post("decide", "/v1/decide", r, r.idempotency_key, m.DecisionResponse)


def create_event(req: Any) -> Prepared:
    r = to_struct(req, m.EventCreateRequest)
    return _post("createEvent", "/v1/events", r, r.idempotency_key, m.EventCreateResponse, expect=201)


def _query(q: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in q.items():
        if v is None:
            continue
        k = "from" if k == "from_" else k
        out[k] = ("true" if v else "false") if isinstance(v, bool) else v
    return out


def list_reservations(**q: Any) -> Prepared:
    return Prepared("GET", "/v1/reservations", "listReservations", None, _query(q), None, 200,
                    m.ReservationListResponse)


def get_reservation(reservation_id: str) -> Prepared:
    return Prepared("GET", f"/v1/reservations/{_rid(reservation_id)}", "getReservation", None, None, None, 200,
                    m.ReservationDetail)


def get_balances(**q: Any) -> Prepared:
    if not any(q.get(lvl) for lvl in ("tenant", "workspace", "app", "workflow", "agent", "toolset")):
        raise ValueError("get_balances needs at least one of tenant, workspace, app, workflow, agent, toolset")
    return Prepared("GET", "/v1/balances", "getBalances", None, _query(q), None, 200, m.BalanceResponse)


# ---------------------------------------------------------------- http plumbing


def headers_for(cfg: CyclesConfig) -> dict[str, str]:
    h = {"X-Cycles-API-Key": cfg.api_key, "User-Agent": cfg.user_agent, "Accept": "application/json"}
    h.update(cfg.extra_headers)
    return h


def build_request(http: httpx.Client | httpx.AsyncClient, req: Prepared) -> httpx.Request:
    headers = {}
    if req.content is not None:
        headers["Content-Type"] = "application/json"
    if req.idempotency_key:
        headers["X-Idempotency-Key"] = req.idempotency_key
    return http.build_request(req.method, req.path, content=req.content, params=req.params, headers=headers)


def timeout_for(cfg: CyclesConfig) -> httpx.Timeout:
    return httpx.Timeout(connect=cfg.connect_timeout, read=cfg.read_timeout, write=cfg.write_timeout,
                         pool=cfg.pool_timeout)


def limits_for(cfg: CyclesConfig) -> httpx.Limits:
    return httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_keepalive_connections)


def make_config(config: CyclesConfig | None, kwargs: dict[str, Any]) -> CyclesConfig:
    if config is not None:
        return config.with_(**kwargs) if kwargs else config
    if "base_url" in kwargs and "api_key" in kwargs:
        return CyclesConfig(**kwargs)
    return CyclesConfig.from_env(**kwargs)


