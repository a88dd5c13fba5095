"""Request plumbing shared by every route: correlation ids, body decoding, error bodies, responses."""

from __future__ import annotations

import itertools
import logging
import random
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ..protocol import models as m
from ..protocol.errors import ErrorCode, ProtocolError, StoreUnavailable
from ..store.base import reset_journal
from .errors_compat import trace_in_error_body

log = logging.getLogger("cycles.server")

MAX_BODY_BYTES = 64 * 1024
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_ZERO32 = "0" * 32
T = TypeVar("T")


@dataclass(slots=True)
class Ctx:
    request_id: str
    trace_id: str
    trace_flags: str
    started: float
    tenant: str | None = None
    route: str = ""
    extra_headers: dict[str, str] = field(default_factory=dict)
    trace_in_errors: bool = True
    principal: Any = None  # set once the request authenticated
    auth_failed: bool = False
    audit: dict[str, Any] | None = None  # this request's audit row, filled as the request goes
    journal: list[dict[str, Any]] | None = None  # rows waiting for the request's write transaction
    view: Any = None  # the tenant's governance view (govcache.TenantView) on runtime routes
    runtime: bool = False  # a runtime route (reservations, decide, events): no audit row for tenant keys


def trace_from(headers: Any) -> tuple[str, str]:
    """trace id and flags by the precedence of §CORRELATION AND TRACING; malformed headers are ignored."""
    tp = headers.get("traceparent")
    if tp:
        match = _TRACEPARENT.match(tp.strip())
        if match and match.group(1) != _ZERO32 and match.group(2) != "0" * 16:
            return match.group(1), match.group(3)
    flat = headers.get("x-cycles-trace-id")
    if flat and _TRACE_ID.match(flat) and flat != _ZERO32:
        return flat, "01"
    while True:  # trace ids need to be random, not secret: no syscall per request
        generated = f"{random.getrandbits(128):032x}"
        if generated != _ZERO32:
            return generated, "01"


_PROCESS = secrets.token_hex(5)  # request ids: a per-process random part and a counter, no syscall each
_SEQ = itertools.count()


def new_ctx(request: Request) -> Ctx:
    trace_id, flags = trace_from(request.headers)
    state = request.app.state.__dict__.get("cycles")  # an app made by create_app; None for a bare Starlette app
    mode = state.error_trace_mode if state is not None else None
    return Ctx(request_id=f"req_{_PROCESS}{next(_SEQ) & 0xFFFFFFFFFFFFFF:014x}", trace_id=trace_id, trace_flags=flags,
               started=time.perf_counter(),
               trace_in_errors=trace_in_error_body(request.headers, mode))


class JSONBody(Response):
    """A finished JSON response: the body and the raw header list are built once, directly."""

    def __init__(self, body: bytes, status: int, headers: list[tuple[bytes, bytes]]) -> None:  # noqa: D107
        self.status_code = status
        self.body = body
        self.raw_headers = headers
        self.background = None


def _raw_headers(ctx: Ctx, body: bytes, extra: dict[str, str] | None = None) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
               (b"x-request-id", ctx.request_id.encode()), (b"x-cycles-trace-id", ctx.trace_id.encode())]
    if ctx.tenant:
        headers.append((b"x-cycles-tenant", ctx.tenant.encode("latin-1", "replace")))
    for more in (ctx.extra_headers, extra):
        if more:
            headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in more.items()]
    return headers


def json_response(ctx: Ctx, obj: Any, status: int = 200) -> Response:
    body = m.encode(obj)
    return JSONBody(body, status, _raw_headers(ctx, body))


def raw_json_response(ctx: Ctx, body: bytes, headers: dict[str, str] | None = None) -> Response:
    """A 200 whose JSON body is already encoded (stored CyclesEvidence envelopes, served byte for byte)."""
    return JSONBody(body, 200, _raw_headers(ctx, body, headers))


def error_body(ctx: Ctx, err: ProtocolError) -> m.ErrorResponse:
    # trace_id in the body is what the spec asks; the published runcycles 0.5.3 SDK cannot read such a body
    # (errors_compat decides per request). The X-Cycles-Trace-Id header always carries it. So does the
    # `cycles_evidence` reference of a denial (cycles.server.evidence), another member that SDK refuses.
    return m.ErrorResponse(error=err.code.value, message=err.message, request_id=ctx.request_id,
                           trace_id=ctx.trace_id if ctx.trace_in_errors else None, details=err.details or None,
                           cycles_evidence=getattr(err, "evidence", None) if ctx.trace_in_errors else None)


def error_response(ctx: Ctx, err: ProtocolError) -> Response:
    body = m.encode(error_body(ctx, err))
    return JSONBody(body, err.status, _raw_headers(ctx, body, err.headers))


async def read_body(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, "Content-Length is not a number") from None
        if declared > MAX_BODY_BYTES:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"Request body exceeds {MAX_BODY_BYTES} bytes")
        return await request.body()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"Request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


_decoders: dict[type, msgspec.json.Decoder] = {}


def decode(raw: bytes, typ: type[T]) -> T:
    decoder = _decoders.get(typ)
    if decoder is None:
        decoder = _decoders[typ] = msgspec.json.Decoder(typ)
    if not raw:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "Request body is required")
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"Invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"Malformed JSON: {exc}") from None
    except UnicodeDecodeError:  # msgspec raises it (not DecodeError) for invalid UTF-8 inside strings
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "Malformed JSON: invalid UTF-8") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "Malformed JSON: nested too deeply") from None


def check_idempotency_header(request: Request, body_key: str) -> None:
    header = request.headers.get("x-idempotency-key")
    if header is not None and header != body_key:
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST,
            "X-Idempotency-Key header and body idempotency_key must match",
            details={"header": header[:256], "body": body_key},
        )


Handler = Callable[[Request, Ctx], Awaitable[Response]]
Observer = Callable[[Ctx, str, int], None]


Auditor = Callable[[Request, Ctx, Response, "ProtocolError | None"], Awaitable[None]]


def endpoint(route: str, observe: Observer | None = None, audit: tuple[Callable[[Request, Ctx], Any], Auditor] | None = None,
             ) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Wrap a handler: correlation ids on every response, protocol errors as spec bodies, never a
    traceback, and (with `audit`: a begin and a finish hook) the request's audit row."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            ctx = new_ctx(request)
            ctx.route = route
            token = audit[0](request, ctx) if audit else None
            failure: ProtocolError | None = None
            try:
                response = await handler(request, ctx)
            except ProtocolError as err:
                failure = err
                response = error_response(ctx, err)
            except StoreUnavailable as exc:
                log.warning("store unavailable on %s: %s", route, exc)
                advice = "retry shortly" if request.method in ("GET", "HEAD") else "retry with the same idempotency key"
                err = ProtocolError(ErrorCode.INTERNAL_ERROR, f"The store is unavailable; {advice}",
                                    status=503, headers={"Retry-After": "1"})
                response = error_response(ctx, err)
            except ClientDisconnect:  # the client went away mid-body (or a body timeout closed it): nobody to answer
                failure = ProtocolError(ErrorCode.INVALID_REQUEST, "Client disconnected before the body was read")
                response = error_response(ctx, failure)
            except Exception:  # noqa: BLE001 - the last line of defence answers with the spec body
                log.exception("unhandled error on %s (request_id=%s)", route, ctx.request_id)
                response = error_response(ctx, ProtocolError(ErrorCode.INTERNAL_ERROR, "Internal server error"))
            if audit:
                try:
                    await audit[1](request, ctx, response, failure)
                except Exception:  # noqa: BLE001 - the change itself committed with its row; this is a failure row
                    log.warning("could not write the audit row of %s (request_id=%s)", route, ctx.request_id,
                                exc_info=True)
                finally:
                    reset_journal(token)
            if observe is not None:
                observe(ctx, request.method, response.status_code)
            return response

        run.__name__ = handler.__name__
        run.__doc__ = handler.__doc__
        return run

    return wrap
