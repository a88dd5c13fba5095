"""The ASGI application."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route

from ..protocol import models as m
from ..protocol.errors import ErrorCode, ProtocolError
from ..store import Store, default_store_url, open_store
from . import openapi
from .audit import hooks as audit_hooks
from .auth import Authenticator
from .hotpath import HotRoutes
from .http import endpoint, error_response, json_response, new_ctx
from .metrics import Metrics
from .routes import OPS
from .scheduler import roll_due
from .state import AppState
from .throttle import FailureRecords

log = logging.getLogger("cycles.server")

HOT_PATHS = frozenset({"/v1/reservations", "/v1/reservations/{reservation_id}/commit",
                       "/v1/reservations/{reservation_id}/release", "/v1/reservations/{reservation_id}/extend",
                       "/v1/decide", "/v1/events"})
IDEMPOTENCY_RETENTION_MS = 7 * 24 * 3600 * 1000  # outlives the longest lease (24 h TTL + extensions)


async def _sweeper(state: AppState, interval_s: float) -> None:
    from ..events import StoreHealthWatcher, run_analyzers

    store = state.store
    health = StoreHealthWatcher()
    purge_every = max(1, int(3600 / interval_s))
    touch_every = max(1, int(1 / interval_s))  # one batched write a second, whatever the traffic
    ticks = 0
    while True:
        await asyncio.sleep(interval_s)
        try:
            while await store.expire_due(500) == 500:
                await asyncio.sleep(0)
            await roll_due(store)
            await run_analyzers(store, latency=state.metrics.p99_ms())
            ticks += 1
            if ticks % touch_every == 0:
                await state.auth.flush_last_used()
            if ticks % purge_every == 0:
                now = await store.now_ms()
                await store.purge_idempotency(now - IDEMPOTENCY_RETENTION_MS)
                await store.purge_audit(now - state.audit_retention_ms)
                await store.purge_events(now - state.audit_retention_ms)
        except Exception:  # noqa: BLE001 - a failed sweep is retried on the next tick
            log.warning("expiry sweep failed", exc_info=True)
        try:  # outages are reported (lost + restored) once the store answers again
            await health.observe(store, await store.health())
        except Exception:  # noqa: BLE001
            log.debug("store health observation failed", exc_info=True)


async def _aggregator(store: Store, interval_ms: int) -> None:
    """Redis Cluster: one drain round of the per-tenant outboxes into the cross-tenant views every interval,
    on the one server that holds the lease (cycles.store.redis_outbox)."""
    outbox = store.outbox  # type: ignore[attr-defined]
    while True:
        await asyncio.sleep(interval_ms / 1000)
        try:
            await outbox.round(interval_ms)
        except Exception:  # noqa: BLE001 - the next round resumes where this one stopped
            log.warning("outbox drain round failed", exc_info=True)


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, not {raw!r}")
    return value


async def _resume_cascades(store: Store) -> None:
    from .admin import finish_cascade

    for tenant in await store.pending_cascades():
        log.warning("finishing the close cascade of tenant %s (interrupted earlier)", tenant)
        await finish_cascade(store, tenant)


def create_app(store: Store | None = None, *, store_url: str | None = None, admin_key: str | None = None,
               sweep_interval_s: float = 1.0, error_trace_id: bool | None = None,
               audit_retention_days: int = 90, local: bool = False, auth_failures_per_minute: int = 20,
               auth_failure_records_per_minute: int = 10, tune_gc: bool = False, evidence: bool = False,
               evidence_server_id: str = "http://127.0.0.1:7878/v1", evidence_public_per_minute: int = 600,
               dashboard: bool = True,
               ) -> Starlette:
    if store is None:
        store = open_store(store_url or default_store_url())
    metrics = Metrics()
    auth = Authenticator(store, admin_key, local=local, failures_per_source=auth_failures_per_minute,
                         failures_per_prefix=max(50, auth_failures_per_minute))
    auth.on_failure = lambda outcome: metrics.auth_failures.labels(outcome).inc()
    records = FailureRecords(auth_failure_records_per_minute,
                             on_unrecorded=lambda: metrics.auth_failures.labels("unrecorded").inc())
    state = AppState(store=store, auth=auth, metrics=metrics,
                     error_trace_id=error_trace_id is not False, error_trace_mode=error_trace_id,
                     audit_retention_ms=audit_retention_days * 86_400_000,
                     secret_box=_secret_box(), health_details=_health_details(admin_key),
                     failure_records=records)
    state.evidence = _evidence(evidence, evidence_server_id, evidence_public_per_minute)

    wrapped = {(op.method, op.path): endpoint(op.operation_id, metrics.observe, audit_hooks(
        op.operation_id, op.tag, next(iter(op.responses), 200)))(op.handler) for op in OPS}
    routes: list[Route | Mount] = [Route(op.path, wrapped[(op.method, op.path)], methods=[op.method]) for op in OPS]

    outbox = getattr(store, "outbox", None)  # Redis Cluster: the cross-tenant views' drain
    aggregate_ms = int(_env_number("CYCLES_AGGREGATE_INTERVAL_MS", 1000))
    lag_bound_s = _env_number("CYCLES_OUTBOX_LAG_BOUND_S", 30)

    async def health(request: Request) -> Response:
        up = await store.health()
        ctx = new_ctx(request)
        details = state.health_details
        if outbox is not None and up:
            with contextlib.suppress(Exception):  # the lag is a detail: the store answered
                details = {**(details or {}), "clusterOutbox": await outbox.status(lag_bound_s)}
        return json_response(ctx, m.HealthResponse(status="UP" if up else "DOWN", details=details),
                             status=200 if up else 503)

    async def liveness(request: Request) -> Response:
        # The process answers; the store is not consulted (that is readiness).
        return json_response(new_ctx(request), m.HealthResponse(status="UP"))

    async def prometheus(request: Request) -> Response:
        with contextlib.suppress(Exception):
            metrics.active.set(await store.count_active())
        if outbox is not None:
            with contextlib.suppress(Exception):
                metrics.cluster_outbox(await outbox.status(lag_bound_s))
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    spec: dict | None = None

    async def openapi_json(request: Request) -> Response:
        nonlocal spec
        if spec is None:
            spec = openapi.build()
        return JSONResponse(spec)

    # Starlette tries routes in order: health checks (polled constantly) and the runtime routes come
    # before the long tail of admin routes.
    routes[0:0] = [
        Route("/actuator/health", health, methods=["GET"]),
        Route("/actuator/health/readiness", health, methods=["GET"]),
        Route("/actuator/health/liveness", liveness, methods=["GET"]),
    ]
    routes += [
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", _docs_page, methods=["GET"]),
    ]
    swagger = _swagger_assets()
    if swagger is not None:
        routes.append(swagger)
    if dashboard:
        from ..dashboard import routes as dashboard_routes

        routes += dashboard_routes()

    async def http_error(request: Request, exc: Exception) -> Response:
        ctx = new_ctx(request)
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            return error_response(ctx, ProtocolError(ErrorCode.INVALID_REQUEST, f"Method {request.method} not allowed",
                                                     status=405))
        if isinstance(exc, HTTPException) and exc.status_code == 404:
            return error_response(ctx, ProtocolError(ErrorCode.NOT_FOUND, f"No route for {request.url.path}"))
        if isinstance(exc, HTTPException) and exc.status_code < 500:
            return error_response(ctx, ProtocolError(ErrorCode.INVALID_REQUEST, str(exc.detail), status=exc.status_code))
        log.error("unhandled error", exc_info=exc)
        return error_response(ctx, ProtocolError(ErrorCode.INTERNAL_ERROR, "Internal server error"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if tune_gc:
            _tune_gc()
        await state.auth.load()
        try:
            await _resume_cascades(store)
        except Exception:  # noqa: BLE001 - the store may be down at startup; the next start retries
            log.warning("could not resume close cascades", exc_info=True)
        task = asyncio.create_task(_sweeper(state, sweep_interval_s)) if sweep_interval_s > 0 else None
        aggregator = asyncio.create_task(_aggregator(store, aggregate_ms)) \
            if outbox is not None and aggregate_ms > 0 else None
        engine = _webhook_engine(state)  # -- webhook delivery: the embedded worker --
        try:
            yield
        finally:
            if engine is not None:
                with contextlib.suppress(Exception):
                    await engine.stop()
            with contextlib.suppress(Exception):
                await state.auth.flush_last_used()
            state.auth.close()
            for background in (task, aggregator):
                if background is not None:
                    background.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await background
            if aggregator is not None:
                with contextlib.suppress(Exception):  # another server takes the drain over at once
                    await outbox.release()
            await store.close()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: http_error})
    app.state.cycles = state
    # also a plain attribute of the State object: Starlette's State reaches its values through __getattr__ (a
    # failed attribute lookup, then a dict lookup), and every request reads this one several times
    app.state.__dict__["cycles"] = state
    return HotRoutes(app, {key: fn for key, fn in wrapped.items() if key[1] in HOT_PATHS})  # type: ignore[return-value]


def _tune_gc() -> None:
    """What is loaded at start lives as long as the process: freeze it out of the cyclic collector, and
    collect the young generation less often (each request makes a few hundred short-lived objects; the
    default threshold runs a collection every few requests and a full one now and then, a latency spike)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _webhook_engine(state: AppState) -> object | None:
    """The embedded webhook dispatcher + delivery worker (cycles.webhooks.deliver), unless
    CYCLES_EMBEDDED_WORKER=0 leaves delivery to separate `cycles worker` processes."""
    if os.environ.get("CYCLES_EMBEDDED_WORKER", "1") == "0":
        return None
    from ..webhooks.deliver import Engine, engine_config_from_env

    try:
        engine = Engine(state.store, box=state.secret_box, metrics=state.metrics, config=engine_config_from_env())
        engine.start()
    except Exception:  # noqa: BLE001 - serving requests does not depend on it
        log.error("the embedded webhook worker could not start", exc_info=True)
        return None
    return engine


def _health_details(admin_key: str | None) -> dict | None:
    from .keystrength import weak_reasons

    reasons = weak_reasons(admin_key)
    if not reasons:
        return None
    log.warning("weak operator key: %s", "; ".join(reasons))
    return {"warnings": [f"weak admin key: {r}" for r in reasons]}


def _evidence(emit: bool, server_id: str, per_minute: int) -> object:
    """CyclesEvidence settings (cycles.server.evidence); the keys come from the environment (`cycles serve`
    checked them, and made the embedded store's key ring, before starting)."""
    from .evidence import Evidence
    from .evidence_keys import KeyRing

    return Evidence(KeyRing.from_env(), server_id, emit=emit, public_per_minute=per_minute)


def _secret_box() -> object | None:
    from ..webhooks.crypto import SecretBox, SecretKeyMissing

    try:
        return SecretBox.from_env()
    except SecretKeyMissing:
        return None  # `cycles serve` refuses to start without one; in-process apps just cannot seal


def create_app_from_env() -> Starlette:
    """Factory for worker processes: `cycles serve` passes its settings through the environment."""
    from .errors_compat import parse_setting

    return create_app(
        store_url=os.environ.get("CYCLES_STORE_URL"),
        admin_key=os.environ.get("CYCLES_ADMIN_API_KEY") or None,
        sweep_interval_s=float(os.environ.get("CYCLES_SWEEP_INTERVAL_MS", "1000")) / 1000,
        error_trace_id=parse_setting(os.environ.get("CYCLES_ERROR_TRACE_ID")),
        audit_retention_days=int(os.environ.get("CYCLES_AUDIT_RETENTION_DAYS", "90")),
        auth_failures_per_minute=int(os.environ.get("CYCLES_AUTH_FAILURES_PER_MINUTE", "20")),
        auth_failure_records_per_minute=int(os.environ.get("CYCLES_AUTH_FAILURE_RECORDS_PER_MINUTE", "10")),
        # a server process of its own (not an app embedded in someone's process): tune its collector
        tune_gc=os.environ.get("CYCLES_GC_TUNE", "1") != "0",
        dashboard=os.environ.get("CYCLES_DASHBOARD", "1") != "0",
        evidence=os.environ.get("CYCLES_EVIDENCE", "0").strip().lower() in ("1", "true", "yes", "on"),
        evidence_server_id=os.environ.get("CYCLES_EVIDENCE_SERVER_ID") or "http://127.0.0.1:7878/v1",
        evidence_public_per_minute=int(os.environ.get("CYCLES_EVIDENCE_PUBLIC_PER_MINUTE", "600")),
    )


def _swagger_assets() -> Mount | None:
    try:
        from swagger_ui_bundle import swagger_ui_path
        from starlette.staticfiles import StaticFiles
    except ImportError:
        return None
    return Mount("/docs/assets", app=StaticFiles(directory=swagger_ui_path), name="swagger")


_DOCS = """<!doctype html>
<html><head><meta charset="utf-8"><title>Cycles API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
</body></html>"""


async def _docs_page(request: Request) -> Response:
    return HTMLResponse(_DOCS)
