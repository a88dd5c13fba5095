"""`@cycles(...)`: guard a sync or async function, generator or async generator.

Drop-in for runcycles' decorator (same parameters), plus `idempotency_key` (value or callable; the
reservation key, with `commit-<key>` / `release-<key>` derived from it), `metadata` (value or callable;
sent on the reservation and carried into the commit-recovery event), `shadow=True` (run the function,
record the would-be decision, hold and charge nothing), and `on_heartbeat_event`.

The work is released on ANY BaseException (including CancelledError, KeyboardInterrupt, and a
generator closed early with GeneratorExit); once it has returned, the actual is committed and never
released.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Any, Callable

from ..protocol import models as m
from .aio import AsyncCyclesClient
from .config import SUBJECT_LEVELS, CyclesConfig
from .context import _enter, _exit
from .guard import AsyncGuard, SyncGuard
from .lifecycle import CallSpec, Keys, check_amount, evaluate_actual, make_action, make_subject
from .sync import CyclesClient

_defaults_lock = threading.Lock()
_default_config: CyclesConfig | None = None
_default_sync: CyclesClient | None = None
_default_async: AsyncCyclesClient | None = None


def set_default_client(client: CyclesClient | AsyncCyclesClient) -> None:
    """Default client for decorated functions without `client=` (one per kind: sync and async)."""
    global _default_sync, _default_async
    with _defaults_lock:
        if isinstance(client, AsyncCyclesClient):
            _default_async = client
        elif isinstance(client, CyclesClient):
            _default_sync = client
        else:
            raise TypeError("expected a CyclesClient or AsyncCyclesClient")


def set_default_config(config: CyclesConfig) -> None:
    """Config from which a default client of EACH kind is built lazily when first needed."""
    global _default_config, _default_sync, _default_async
    with _defaults_lock:
        _default_config = config
        _default_sync = _default_async = None


def _resolve(client: Any, want_async: bool) -> Any:
    global _default_sync, _default_async
    if client is not None:
        if want_async and not isinstance(client, AsyncCyclesClient):
            raise TypeError("an async function needs an AsyncCyclesClient")
        if not want_async and not isinstance(client, CyclesClient):
            raise TypeError("a sync function needs a CyclesClient")
        return client
    with _defaults_lock:
        if want_async:
            if _default_async is None:
                _default_async = AsyncCyclesClient(_default_config) if _default_config else AsyncCyclesClient()
            return _default_async
        if _default_sync is None:
            _default_sync = CyclesClient(_default_config) if _default_config else CyclesClient()
        return _default_sync


def _value(v: Any, args: tuple, kwargs: dict) -> Any:
    return v(*args, **kwargs) if callable(v) else v


def cycles(estimate: int | Callable[..., int], *, actual: int | Callable[[Any], int] | None = None,
           action_kind: str | Callable[..., str] | None = None, action_name: str | Callable[..., str] | None = None,
           action_tags: list[str] | Callable[..., list[str]] | None = None, unit: str = "USD_MICROCENTS",
           ttl_ms: int = 60_000, grace_period_ms: int | None = None, overage_policy: str = "ALLOW_IF_AVAILABLE",
           dry_run: bool = False, tenant: Any = None, workspace: Any = None, app: Any = None, workflow: Any = None,
           agent: Any = None, toolset: Any = None, dimensions: Any = None, client: Any = None,
           use_estimate_if_actual_not_provided: bool = True, idempotency_key: str | Callable[..., str] | None = None,
           metadata: dict[str, Any] | Callable[..., dict[str, Any]] | None = None, shadow: bool = False,
           on_heartbeat_event: Callable[[Any], Any] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    unit = getattr(unit, "value", unit)
    if unit not in m.UNITS:
        raise ValueError(f"unit must be one of {', '.join(m.UNITS)}")
    if type(ttl_ms) is not int or not 1000 <= ttl_ms <= 86_400_000:
        raise ValueError("ttl_ms must be an int in 1000..86400000")
    if grace_period_ms is not None and (type(grace_period_ms) is not int or not 0 <= grace_period_ms <= 60_000):
        raise ValueError("grace_period_ms must be an int in 0..60000")
    if overage_policy not in ("REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"):
        raise ValueError("overage_policy must be REJECT, ALLOW_IF_AVAILABLE or ALLOW_WITH_OVERDRAFT")
    if dry_run and shadow:
        raise ValueError("dry_run (do not run, return the decision) and shadow (run, record the decision) "
                         "are exclusive")
    if actual is None and not use_estimate_if_actual_not_provided:
        raise ValueError("actual is required when use_estimate_if_actual_not_provided=False")
    if actual is not None and not callable(actual):
        check_amount(actual, "actual")
    levels = {"tenant": tenant, "workspace": workspace, "app": app, "workflow": workflow, "agent": agent,
              "toolset": toolset}

    def build(cl: Any, args: tuple, kwargs: dict) -> CallSpec:
        est = check_amount(_value(estimate, args, kwargs), "estimate")
        subject = make_subject(cl.config, {k: _value(v, args, kwargs) for k, v in levels.items()},
                               _value(dimensions, args, kwargs))
        action = make_action(_value(action_kind, args, kwargs), _value(action_name, args, kwargs),
                             _value(action_tags, args, kwargs))
        md = _value(metadata, args, kwargs)
        if md is not None and not isinstance(md, dict):
            raise TypeError("metadata must be a dict (or a callable returning one)")
        return CallSpec(est, unit, subject, action, ttl_ms, grace_period_ms, overage_policy, md,
                        Keys.from_key(_value(idempotency_key, args, kwargs)))

    def settle_actual(result: Any, spec: CallSpec) -> tuple[int, str | None]:
        return evaluate_actual(actual, result, spec.estimate, use_estimate_if_actual_not_provided)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(fn):
            return _wrap_async_gen(fn)
        if inspect.iscoroutinefunction(fn):
            return _wrap_async(fn)
        if inspect.isgeneratorfunction(fn):
            return _wrap_gen(fn)
        return _wrap_sync(fn)

    def _dry(cl: Any, spec: CallSpec) -> Any:
        from .lifecycle import deny_error

        resp = cl.create_reservation(spec.create_request(dry_run=True))
        if resp.decision == "DENY":
            raise deny_error(resp, dry_run=True)
        return resp

    async def _adry(cl: Any, spec: CallSpec) -> Any:
        from .lifecycle import deny_error

        resp = await cl.create_reservation(spec.create_request(dry_run=True))
        if resp.decision == "DENY":
            raise deny_error(resp, dry_run=True)
        return resp

    def _wrap_sync(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            cl = _resolve(client, False)
            spec = build(cl, args, kwargs)
            if dry_run:
                return _dry(cl, spec)
            guard = SyncGuard(cl, spec, shadow=shadow, on_heartbeat_event=on_heartbeat_event)
            ctx = guard.enter()
            token = _enter(ctx)
            try:
                try:
                    result = fn(*args, **kwargs)
                except BaseException:
                    guard.release("guarded_method_failed")
                    raise
                amount, source = settle_actual(result, spec)
                guard.commit(amount, source)
                return result
            finally:
                _exit(token)

        return wrapper

    def _wrap_async(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            cl = _resolve(client, True)
            spec = build(cl, args, kwargs)
            if dry_run:
                return await _adry(cl, spec)
            guard = AsyncGuard(cl, spec, shadow=shadow, on_heartbeat_event=on_heartbeat_event)
            ctx = await guard.enter()
            token = _enter(ctx)
            try:
                try:
                    result = await fn(*args, **kwargs)
                except BaseException:
                    await guard.release("guarded_method_failed")
                    raise
                amount, source = settle_actual(result, spec)
                await guard.commit(amount, source)
                return result
            finally:
                _exit(token)

        return wrapper

    def _wrap_gen(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            cl = _resolve(client, False)
            spec = build(cl, args, kwargs)
            guard = SyncGuard(cl, spec, shadow=shadow, on_heartbeat_event=on_heartbeat_event)
            ctx = guard.enter()
            gen = fn(*args, **kwargs)
            value: Any = None
            try:
                while True:
                    token = _enter(ctx)
                    try:
                        item = gen.send(value)
                    except StopIteration as stop:
                        result = stop.value
                        break
                    finally:
                        _exit(token)
                    value = yield item
            except BaseException:
                # The body raised, or the consumer stopped early (GeneratorExit) or threw in.
                token = _enter(ctx)
                try:
                    gen.close()
                finally:
                    _exit(token)
                guard.release("guarded_generator_stopped")
                raise
            amount, source = settle_actual(result, spec)
            guard.commit(amount, source)
            return result

        return wrapper

    def _wrap_async_gen(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            cl = _resolve(client, True)
            spec = build(cl, args, kwargs)
            guard = AsyncGuard(cl, spec, shadow=shadow, on_heartbeat_event=on_heartbeat_event)
            ctx = await guard.enter()
            agen = fn(*args, **kwargs)
            value: Any = None
            try:
                while True:
                    token = _enter(ctx)
                    try:
                        item = await agen.asend(value)
                    except StopAsyncIteration:
                        break
                    finally:
                        _exit(token)
                    value = yield item
            except BaseException:
                token = _enter(ctx)
                try:
                    await agen.aclose()
                finally:
                    _exit(token)
                await guard.release("guarded_generator_stopped")
                raise
            amount, source = settle_actual(None, spec)
            await guard.commit(amount, source)

        return wrapper

    return decorate


__all__ = ["cycles", "set_default_client", "set_default_config", "SUBJECT_LEVELS"]
