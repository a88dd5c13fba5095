"""runcycles 0.5.3 compatibility layer: `import cycles.client.compat as runcycles`.

The published SDK's public surface with the same names and call shapes, built on this SDK:

* `CyclesClient` / `AsyncCyclesClient`: the nine low-level methods return a `CyclesResponse` (status,
  raw body dict, selected headers) and never raise for an HTTP outcome; a transport failure is
  `status == -1`. Bodies may be models or plain dicts (sent as-is). No retries (as published).
  Requests go through the wrapped native client's transport (`core.Prepared` + `_send`).
* `cycles`, `set_default_client`, `set_default_config`, `stream_reservation` accept the compat clients
  and config and run this SDK's lifecycle (journal, heartbeat, recovery) underneath.
* `CyclesConfig`: runcycles' mutable dataclass (same fields, defaults and `from_env` parsing; the
  journal defaults to `~/.runcycles/commit-journal`, so records left by runcycles are replayed).
* Exceptions are this SDK's classes (so `except BudgetExceededError` catches what the decorator raises).
* Models and enums live in `compat_models` and are re-exported here: thin subclasses of the protocol's
  msgspec models that validate at construction (raising ValueError, like pydantic's ValidationError) and add
  pydantic-style helpers (`model_dump`, `model_dump_json`, `model_validate`, `model_validate_json`); enums
  are `str` enums.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import httpx
import msgspec

from . import core as _core
from . import decorator as _deco
from .aio import AsyncCyclesClient as _NativeAsync
from .config import CyclesConfig as _NativeConfig
from .context import CyclesContext, get_cycles_context
from .errors import (BudgetExceededError, CyclesError, CyclesProtocolError, CyclesTransportError,
                     DebtOutstandingError, OverdraftLimitExceededError, ReservationExpiredError,
                     ReservationFinalizedError, TenantClosedError)
from .streaming import AsyncStreamReservation, StreamReservation, StreamUsage
from .sync import CyclesClient as _NativeSync

logger = logging.getLogger("cycles.client.compat")

__version__ = "0.5.3"  # the runcycles surface this module mirrors


from .compat_models import (Unit, CommitOveragePolicy, Decision, ReservationStatus, CommitStatus, ReleaseStatus,
                            ExtendStatus, EventStatus, ErrorCode, Amount, SignedAmount, Subject, Action, Caps,
                            CyclesMetrics, Balance, ReservationCreateRequest, CommitRequest, ReleaseRequest,
                            ReservationExtendRequest, DecisionRequest, EventCreateRequest,
                            ReservationCreateResponse, DryRunResult, CommitResponse, ReleaseResponse,
                            ReservationExtendResponse, DecisionResponse, EventCreateResponse, ReservationDetail,
                            ReservationSummary, ReservationListResponse, BalanceResponse, ErrorResponse)


# ====================================================================== response wrapper


_RESPONSE_HEADERS = ("x-request-id", "x-ratelimit-remaining", "x-ratelimit-reset", "x-cycles-tenant", "retry-after",
                     "date")


@dataclass
class CyclesResponse:
    """runcycles' uniform response: success, HTTP error (status >= 300) or transport error (status -1)."""

    status: int
    body: dict[str, Any] | None = None
    error_message: str | None = None
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    _is_transport_error: bool = field(default=False, repr=False)
    transport_exception: Exception | None = field(default=None, repr=False)

    @classmethod
    def success(cls, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> "CyclesResponse":
        return cls(status=status, body=body, headers=headers or {})

    @classmethod
    def http_error(cls, status: int, error_message: str, body: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> "CyclesResponse":
        return cls(status=status, body=body, error_message=error_message, headers=headers or {})

    @classmethod
    def transport_error(cls, ex: Exception) -> "CyclesResponse":
        return cls(status=-1, error_message=str(ex), _is_transport_error=True, transport_exception=ex)

    @classmethod
    def from_httpx(cls, resp: httpx.Response) -> "CyclesResponse":
        try:
            body = resp.json()
        except Exception:  # noqa: BLE001 - non-JSON body
            body = None
        headers = {n: resp.headers[n] for n in _RESPONSE_HEADERS if resp.headers.get(n) is not None}
        if 200 <= resp.status_code < 300:
            return cls.success(resp.status_code, body or {}, headers=headers)
        msg = (body.get("message") or body.get("error")) if isinstance(body, dict) else None
        return cls.http_error(resp.status_code, msg or resp.reason_phrase or "Unknown error", body, headers=headers)

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")

    @property
    def rate_limit_remaining(self) -> int | None:
        val = self.headers.get("x-ratelimit-remaining")
        return int(val) if val is not None else None

    @property
    def rate_limit_reset(self) -> int | None:
        val = self.headers.get("x-ratelimit-reset")
        return int(val) if val is not None else None

    @property
    def cycles_tenant(self) -> str | None:
        return self.headers.get("x-cycles-tenant")

    @property
    def retry_after_ms_header(self) -> int | None:
        val = self.headers.get("retry-after")
        if val is None or re.fullmatch(r"[0-9]+", val.strip()) is None:
            return None
        seconds = int(val.strip())
        return None if seconds > 9_223_372_036_854_775_807 // 1000 else seconds * 1000

    @property
    def server_date_ms(self) -> int | None:
        val = self.headers.get("date")
        if val is None:
            return None
        try:
            return int(parsedate_to_datetime(val).timestamp() * 1000)
        except (ValueError, TypeError):
            return None

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    @property
    def is_client_error(self) -> bool:
        return 400 <= self.status < 500

    @property
    def is_server_error(self) -> bool:
        return 500 <= self.status < 600

    @property
    def is_transport_error(self) -> bool:
        return self._is_transport_error

    def get_body_attribute(self, key: str) -> Any:
        if self.body and key in self.body:
            return self.body[key]
        return None

    def get_error_response(self) -> Any:
        if self.body and isinstance(self.body, dict):
            try:
                return msgspec.convert(self.body, ErrorResponse)
            except (msgspec.ValidationError, TypeError):
                return None
        return None


# ====================================================================== config


def _default_journal_dir() -> str:
    return str(Path.home() / ".runcycles" / "commit-journal")


@dataclass
class CyclesConfig:
    """runcycles' CyclesConfig: same fields, defaults (seconds) and environment parsing."""

    base_url: str
    api_key: str
    tenant: str | None = None
    workspace: str | None = None
    app: str | None = None
    workflow: str | None = None
    agent: str | None = None
    toolset: str | None = None
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    retry_enabled: bool = True
    retry_max_attempts: int = 5
    retry_initial_delay: float = 0.5
    retry_multiplier: float = 2.0
    retry_max_delay: float = 30.0
    retry_flush_timeout: float = 10.0
    journal_enabled: bool = True
    journal_dir: str | None = None  # None -> ~/.runcycles/commit-journal (records left by runcycles replay)

    @classmethod
    def from_env(cls, prefix: str = "CYCLES_") -> "CyclesConfig":
        env = os.environ
        base_url = env.get(f"{prefix}BASE_URL", "")
        api_key = env.get(f"{prefix}API_KEY", "")
        if not base_url:
            raise ValueError(f"{prefix}BASE_URL environment variable is required")
        if not api_key:
            raise ValueError(f"{prefix}API_KEY environment variable is required")
        return cls(
            base_url=base_url, api_key=api_key, tenant=env.get(f"{prefix}TENANT"),
            workspace=env.get(f"{prefix}WORKSPACE"), app=env.get(f"{prefix}APP"),
            workflow=env.get(f"{prefix}WORKFLOW"), agent=env.get(f"{prefix}AGENT"),
            toolset=env.get(f"{prefix}TOOLSET"),
            connect_timeout=float(env.get(f"{prefix}CONNECT_TIMEOUT", "2.0")),
            read_timeout=float(env.get(f"{prefix}READ_TIMEOUT", "5.0")),
            retry_enabled=env.get(f"{prefix}RETRY_ENABLED", "true").lower() == "true",
            retry_max_attempts=int(env.get(f"{prefix}RETRY_MAX_ATTEMPTS", "5")),
            retry_initial_delay=float(env.get(f"{prefix}RETRY_INITIAL_DELAY", "0.5")),
            retry_multiplier=float(env.get(f"{prefix}RETRY_MULTIPLIER", "2.0")),
            retry_max_delay=float(env.get(f"{prefix}RETRY_MAX_DELAY", "30.0")),
            retry_flush_timeout=float(env.get(f"{prefix}RETRY_FLUSH_TIMEOUT", "10.0")),
            journal_enabled=env.get(f"{prefix}JOURNAL_ENABLED", "true").lower() == "true",
            journal_dir=env.get(f"{prefix}JOURNAL_DIR"),
        )

    def to_native(self) -> _NativeConfig:
        """The equivalent `cycles.client.CyclesConfig` (write/pool timeouts 5 s, as runcycles hard-codes)."""
        return _NativeConfig(
            base_url=self.base_url, api_key=self.api_key, tenant=self.tenant, workspace=self.workspace,
            app=self.app, workflow=self.workflow, agent=self.agent, toolset=self.toolset,
            connect_timeout=self.connect_timeout, read_timeout=self.read_timeout, write_timeout=5.0, pool_timeout=5.0,
            retry_enabled=self.retry_enabled, retry_max_attempts=self.retry_max_attempts,
            retry_initial_delay=self.retry_initial_delay, retry_multiplier=self.retry_multiplier,
            retry_max_delay=self.retry_max_delay,
            # runcycles: 0 disables the exit wait; ours needs > 0, so 0 becomes a 1 ms (effectively no) wait.
            retry_flush_timeout=self.retry_flush_timeout if self.retry_flush_timeout > 0 else 0.001,
            journal_enabled=self.journal_enabled, journal_dir=self.journal_dir or _default_journal_dir(),
            user_agent="cycles-python-sdk (runcycles-compat)",
        )


def _native_config(config: Any) -> _NativeConfig:
    if isinstance(config, CyclesConfig):
        return config.to_native()
    if isinstance(config, _NativeConfig):
        return config
    raise TypeError(f"expected a CyclesConfig, got {type(config).__name__}")


# ====================================================================== clients

_BALANCE_FILTERS = {"tenant", "workspace", "app", "workflow", "agent", "toolset"}


def _validate_balance_filters(params: dict[str, Any]) -> None:
    if not any(k in _BALANCE_FILTERS for k in params):
        raise ValueError("get_balances requires at least one subject filter "
                         "(tenant, workspace, app, workflow, agent, or toolset)")


def _body(body: Any) -> tuple[bytes, str | None]:
    """Models are serialised without nulls; dicts are sent as-is (the server validates them)."""
    if isinstance(body, dict):
        data: Any = body
    elif isinstance(body, msgspec.Struct):
        data = msgspec.to_builtins(body)
    elif hasattr(body, "model_dump"):  # a pydantic model (e.g. a real runcycles model)
        data = body.model_dump(exclude_none=True, mode="json")
    else:
        raise TypeError(f"Unsupported body type: {type(body)}")
    key = data.get("idempotency_key")
    return json.dumps(data, default=str).encode(), key if isinstance(key, str) and key else None


def _rid(reservation_id: str) -> str:
    return quote(str(reservation_id), safe="")


def _post(op: str, path: str, body: Any) -> _core.Prepared:
    content, key = _body(body)
    return _core.Prepared("POST", path, op, content, None, key)


def _get(op: str, path: str, params: dict[str, Any] | None = None) -> _core.Prepared:
    return _core.Prepared("GET", path, op, None, _core._query(params) if params else None)


def _answer(req: _core.Prepared, outcome: Any) -> CyclesResponse:
    if isinstance(outcome, BaseException):
        logger.error("Transport error on %s %s: %s", req.method, req.path, outcome)
        return CyclesResponse.transport_error(outcome)  # type: ignore[arg-type]
    return CyclesResponse.from_httpx(outcome)


class _Requests:
    """The Prepared request of each low-level method (shared by the sync and async clients)."""

    @staticmethod
    def create_reservation(request: Any) -> _core.Prepared:
        return _post("createReservation", "/v1/reservations", request)

    @staticmethod
    def commit_reservation(reservation_id: str, request: Any) -> _core.Prepared:
        return _post("commitReservation", f"/v1/reservations/{_rid(reservation_id)}/commit", request)

    @staticmethod
    def release_reservation(reservation_id: str, request: Any) -> _core.Prepared:
        return _post("releaseReservation", f"/v1/reservations/{_rid(reservation_id)}/release", request)

    @staticmethod
    def extend_reservation(reservation_id: str, request: Any) -> _core.Prepared:
        return _post("extendReservation", f"/v1/reservations/{_rid(reservation_id)}/extend", request)

    @staticmethod
    def decide(request: Any) -> _core.Prepared:
        return _post("decide", "/v1/decide", request)

    @staticmethod
    def create_event(request: Any) -> _core.Prepared:
        return _post("createEvent", "/v1/events", request)

    @staticmethod
    def list_reservations(params: dict[str, Any]) -> _core.Prepared:
        return _get("listReservations", "/v1/reservations", params)

    @staticmethod
    def get_reservation(reservation_id: str) -> _core.Prepared:
        return _get("getReservation", f"/v1/reservations/{_rid(reservation_id)}")

    @staticmethod
    def get_balances(params: dict[str, Any]) -> _core.Prepared:
        _validate_balance_filters(params)
        return _get("getBalances", "/v1/balances", params)


def _stream_kwargs(subject: Any, kw: dict[str, Any]) -> dict[str, Any]:
    if subject is not None:
        kw["subject"] = subject
    return kw


class CyclesClient:
    """runcycles' synchronous client. Low-level methods return `CyclesResponse` and never raise for an
    HTTP or transport outcome. `native` is the wrapped `cycles.client.CyclesClient` (used by `@cycles`
    and `stream_reservation`); any other attribute (`flush`, `recover_pending`, `settle`, ...) is
    forwarded to it."""

    def __init__(self, config: CyclesConfig | _NativeConfig, **native_kwargs: Any) -> None:
        self._config = config
        self.native = _NativeSync(_native_config(config), **native_kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "native":
            raise AttributeError(name)
        return getattr(self.native, name)

    def _do(self, req: _core.Prepared) -> CyclesResponse:
        return _answer(req, self.native._send(req))

    def create_reservation(self, request: Any) -> CyclesResponse:
        return self._do(_Requests.create_reservation(request))

    def commit_reservation(self, reservation_id: str, request: Any) -> CyclesResponse:
        return self._do(_Requests.commit_reservation(reservation_id, request))

    def release_reservation(self, reservation_id: str, request: Any) -> CyclesResponse:
        return self._do(_Requests.release_reservation(reservation_id, request))

    def extend_reservation(self, reservation_id: str, request: Any) -> CyclesResponse:
        return self._do(_Requests.extend_reservation(reservation_id, request))

    def decide(self, request: Any) -> CyclesResponse:
        return self._do(_Requests.decide(request))

    def list_reservations(self, **query_params: Any) -> CyclesResponse:
        return self._do(_Requests.list_reservations(query_params))

    def get_reservation(self, reservation_id: str) -> CyclesResponse:
        return self._do(_Requests.get_reservation(reservation_id))

    def get_balances(self, **query_params: Any) -> CyclesResponse:
        return self._do(_Requests.get_balances(query_params))

    def create_event(self, request: Any) -> CyclesResponse:
        return self._do(_Requests.create_event(request))

    def stream_reservation(self, *, subject: Any = None, **kwargs: Any) -> StreamReservation:
        return self.native.stream_reservation(**_stream_kwargs(subject, kwargs))

    def close(self) -> None:
        self.native.close()

    def __enter__(self) -> "CyclesClient":
        return self

    def __exit__(self, *args: Any) -> None:
        self.close()


class AsyncCyclesClient:
    """runcycles' asyncio client; see `CyclesClient`. `native` is a `cycles.client.AsyncCyclesClient`."""

    def __init__(self, config: CyclesConfig | _NativeConfig, **native_kwargs: Any) -> None:
        self._config = config
        self.native = _NativeAsync(_native_config(config), **native_kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "native":
            raise AttributeError(name)
        return getattr(self.native, name)

    async def _do(self, req: _core.Prepared) -> CyclesResponse:
        return _answer(req, await self.native._send(req))

    async def create_reservation(self, request: Any) -> CyclesResponse:
        return await self._do(_Requests.create_reservation(request))

    async def commit_reservation(self, reservation_id: str, request: Any) -> CyclesResponse:
        return await self._do(_Requests.commit_reservation(reservation_id, request))

    async def release_reservation(self, reservation_id: str, request: Any) -> CyclesResponse:
        return await self._do(_Requests.release_reservation(reservation_id, request))

    async def extend_reservation(self, reservation_id: str, request: Any) -> CyclesResponse:
        return await self._do(_Requests.extend_reservation(reservation_id, request))

    async def decide(self, request: Any) -> CyclesResponse:
        return await self._do(_Requests.decide(request))

    async def list_reservations(self, **query_params: Any) -> CyclesResponse:
        return await self._do(_Requests.list_reservations(query_params))

    async def get_reservation(self, reservation_id: str) -> CyclesResponse:
        return await self._do(_Requests.get_reservation(reservation_id))

    async def get_balances(self, **query_params: Any) -> CyclesResponse:
        return await self._do(_Requests.get_balances(query_params))

    async def create_event(self, request: Any) -> CyclesResponse:
        return await self._do(_Requests.create_event(request))

    def stream_reservation(self, *, subject: Any = None, **kwargs: Any) -> AsyncStreamReservation:
        return self.native.stream_reservation(**_stream_kwargs(subject, kwargs))

    async def aclose(self) -> None:
        await self.native.aclose()

    async def __aenter__(self) -> "AsyncCyclesClient":
        return self

    async def __aexit__(self, *args: Any) -> None:
        await self.aclose()


def _native_client(client: Any) -> Any:
    return client.native if isinstance(client, (CyclesClient, AsyncCyclesClient)) else client


# ====================================================================== decorator and defaults


def set_default_client(client: Any) -> None:
    """Default client for `@cycles` functions without `client=` (compat or native, sync or async)."""
    _deco.set_default_client(_native_client(client))


def set_default_config(config: Any) -> None:
    _deco.set_default_config(_native_config(config))


def _as_dry_run_result(resp: Any) -> Any:
    return msgspec.convert(msgspec.to_builtins(resp), DryRunResult) if isinstance(resp, msgspec.Struct) else resp


def cycles(estimate: Any, *, client: Any = None, dry_run: bool = False, **kwargs: Any
           ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """runcycles' `@cycles` (same parameters, plus this SDK's extras), run by `cycles.client.cycles`."""
    native = _deco.cycles(estimate, client=_native_client(client), dry_run=dry_run, **kwargs)
    if not dry_run:
        return native

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        wrapped = native(fn)
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def awrapper(*a: Any, **kw: Any) -> Any:
                return _as_dry_run_result(await wrapped(*a, **kw))

            return awrapper

        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            return _as_dry_run_result(wrapped(*a, **kw))

        return wrapper

    return decorate


__all__ = [
    "CyclesClient", "AsyncCyclesClient", "CyclesConfig", "cycles", "set_default_client", "set_default_config",
    "CyclesContext", "get_cycles_context", "CyclesResponse", "StreamReservation", "AsyncStreamReservation",
    "StreamUsage", "CyclesError", "CyclesProtocolError", "CyclesTransportError", "BudgetExceededError",
    "DebtOutstandingError", "OverdraftLimitExceededError", "ReservationExpiredError", "ReservationFinalizedError",
    "TenantClosedError", "Unit", "Amount", "SignedAmount", "Subject", "Action", "Caps", "Decision", "CyclesMetrics",
    "Balance", "CommitOveragePolicy", "ErrorCode", "ErrorResponse", "ReservationStatus", "CommitStatus",
    "ReleaseStatus", "ExtendStatus", "EventStatus", "ReservationCreateRequest", "CommitRequest", "ReleaseRequest",
    "ReservationExtendRequest", "DecisionRequest", "EventCreateRequest", "ReservationCreateResponse",
    "CommitResponse", "ReleaseResponse", "ReservationExtendResponse", "DecisionResponse", "EventCreateResponse",
    "DryRunResult", "ReservationDetail", "ReservationSummary", "ReservationListResponse", "BalanceResponse",
]
