"""What every integration shares: its options, the reservation of one priced LLM call, its settlement
from the provider's usage, and stream proxies that settle when the stream ends.

Built on the SDK's own guard (`cycles.client.guard`): reserve with a typed error on DENY *before* the
provider is called, release on failure, commit through the client's settler (journal, same-key retries).
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from ..client.decorator import _resolve
from ..client.guard import AsyncGuard, SyncGuard
from ..client.lifecycle import CallSpec, Keys, check_amount, make_action, make_subject
from ..pricing import Pricer, PriceTable, UnknownModelError, default_pricer
from ..pricing.usage import extract_usage

log = logging.getLogger("cycles.integrations")

SUBJECT_FIELDS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")

# The subject of the web request being served (set by the ASGI/Django/Flask middleware).
_request_subject: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("cycles_request_subject",
                                                                                         default=None)


def request_subject() -> dict[str, Any]:
    """The subject fields the web middleware derived for the current request ({} outside one)."""
    return dict(_request_subject.get() or {})


class OuterGuard:
    """Marks a context in which an integration has reserved the LLM call now running (a LangChain handler's
    chat model run, a framework model wrapper's request). A provider client instrumented by this package,
    called inside it, passes through instead of reserving and charging the same call a second time.
    `open` goes False when the outer call settles, wherever that happens (LangChain may end a run in
    another context), so a stale marker never lets a later call through unguarded."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = True


_outer_guard: contextvars.ContextVar[OuterGuard | None] = contextvars.ContextVar("cycles_outer_guard", default=None)


def outer_guarded() -> bool:
    """True inside a call an integration already reserved (instrumented clients then pass through)."""
    g = _outer_guard.get()
    return g is not None and g.open


def open_outer_guard() -> OuterGuard:
    """Mark the current context (until `close_outer_guard`)."""
    g = OuterGuard()
    _outer_guard.set(g)
    return g


def close_outer_guard(g: OuterGuard | None) -> None:
    if g is None:
        return
    g.open = False
    if _outer_guard.get() is g:
        _outer_guard.set(None)


class outer_guard:
    """`with outer_guard():` around a wrapped model's call (same context start to end)."""

    def __enter__(self) -> OuterGuard:
        self._g = OuterGuard()
        self._token = _outer_guard.set(self._g)
        return self._g

    def __exit__(self, *exc: Any) -> None:
        self._g.open = False
        _outer_guard.reset(self._token)


@dataclass
class LLMRequest:
    """One provider call as the integration sees it before sending it."""

    provider: str
    model: str
    input_tokens: int  # bound (or the caller's counter)
    max_output_tokens: int
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    context: dict[str, str] = field(default_factory=dict)  # genai-prices price context (service_tier ...)
    operation: str = "llm"


@dataclass
class Options:
    """Options every integration takes (as keyword arguments).

    A value of a subject field, `action_name`, `metadata` or `estimate` may be a callable: it gets the
    `LLMRequest` (or, for tools and web requests, what that integration documents) and returns the value.
    """

    cycles_client: Any = None  # CyclesClient / AsyncCyclesClient; default: the SDK's default (env)
    tenant: Any = None
    workspace: Any = None
    app: Any = None
    workflow: Any = None
    agent: Any = None
    toolset: Any = None
    dimensions: Any = None
    action_kind: str = "llm.completion"
    action_name: Any = None  # default "<provider>:<model>"
    action_tags: list[str] | None = None
    unit: str = "USD_MICROCENTS"
    pricer: Pricer | None = None
    price_table: PriceTable | Mapping[str, Any] | None = None
    fallback_price: Any = None
    estimate: Any = None  # int or callable(LLMRequest) -> int: replaces the priced bound
    token_counter: Callable[[LLMRequest], int] | None = None  # exact prompt tokens instead of the bound
    default_max_output_tokens: int = 4096
    shadow: bool = False
    dry_run: bool = False  # for a provider call the same as shadow: decide, run, hold and charge nothing
    idempotency_key: Callable[[Any], str | None] | None = None
    metadata: Any = None
    ttl_ms: int = 120_000
    overage_policy: str = "ALLOW_IF_AVAILABLE"

    @classmethod
    def of(cls, options: Mapping[str, Any], extra: tuple[str, ...] = ()) -> tuple["Options", dict[str, Any]]:
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known - set(extra)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        opts = cls(**{k: v for k, v in options.items() if k in known})
        rest = {k: v for k, v in options.items() if k in extra}
        if opts.pricer is None:
            opts.pricer = (Pricer(opts.unit, table=opts.price_table, fallback=opts.fallback_price)
                           if (opts.price_table is not None or opts.fallback_price is not None
                               or opts.unit != "USD_MICROCENTS") else default_pricer())
        elif opts.pricer.unit != opts.unit and opts.unit != "USD_MICROCENTS":
            raise ValueError(f"unit {opts.unit!r} differs from the pricer's unit {opts.pricer.unit!r}")
        opts.unit = opts.pricer.unit
        if opts.estimate is not None and not callable(opts.estimate):
            check_amount(opts.estimate, "estimate")
        if type(opts.default_max_output_tokens) is not int or opts.default_max_output_tokens < 1:
            raise ValueError("default_max_output_tokens must be a positive int")
        return opts, rest

    @property
    def is_shadow(self) -> bool:
        return self.shadow or self.dry_run

    def client(self, want_async: bool) -> Any:
        return _resolve(self.cycles_client, want_async)

    def with_(self, **changes: Any) -> "Options":
        new = Options(**{f.name: getattr(self, f.name) for f in fields(self)})
        for k, v in changes.items():
            setattr(new, k, v)
        return new


def _value(v: Any, arg: Any) -> Any:
    return v(arg) if callable(v) else v


def build_spec(opts: Options, cl: Any, arg: Any, *, estimate: int, action_kind: str | None = None,
               action_name: str | None = None, subject_overrides: Mapping[str, Any] | None = None) -> CallSpec:
    levels = {k: _value(getattr(opts, k), arg) for k in SUBJECT_FIELDS}
    # below the options: what the framework run carries, then the web request's subject (middleware)
    from_request = _request_subject.get() or {}
    for source in (subject_overrides or {}, from_request):
        for k, v in source.items():
            if v and k in SUBJECT_FIELDS and not levels.get(k):
                levels[k] = v
    dims = _value(opts.dimensions, arg) or from_request.get("dimensions")
    subject = make_subject(cl.config, levels, dims)
    name = _value(opts.action_name, arg) or action_name or "unknown"
    action = make_action(action_kind or opts.action_kind, str(name)[:256], opts.action_tags)
    md = _value(opts.metadata, arg)
    key = opts.idempotency_key(arg) if opts.idempotency_key is not None else None
    return CallSpec(check_amount(estimate, "estimate"), opts.unit, subject, action, opts.ttl_ms, None,
                    opts.overage_policy, md, Keys.from_key(key))


def llm_estimate(opts: Options, req: LLMRequest, tenant: str | None) -> int:
    """The reservation's amount: the caller's override, else the priced upper bound (rounded up).
    Raises UnknownModelError for a model without a price (nothing is reserved nor sent)."""
    if opts.estimate is not None:
        return check_amount(_value(opts.estimate, req), "estimate")
    assert opts.pricer is not None
    return opts.pricer.estimate(req.model, req.provider, input_tokens=req.input_tokens,
                                output_tokens=req.max_output_tokens, tenant=tenant, context=req.context or None)


def input_tokens(opts: Options, req: LLMRequest, bound: int) -> int:
    if opts.token_counter is None:
        return bound
    return check_amount(opts.token_counter(req), "token_counter result")


@dataclass
class Priced:
    amount: int
    source: str | None  # None: priced from usage; "estimate": no usage, the estimate was committed
    usage: Any = None
    model: str | None = None


def price_usage(opts: Options, req: LLMRequest, usage: Any, model: str | None, tenant: str | None,
                context: Mapping[str, str] | None = None) -> Priced:
    """The priced actual of a usage object; the response's model first, then the request's."""
    assert opts.pricer is not None
    last: Exception | None = None
    for ref in dict.fromkeys(m for m in (model, req.model) if m):
        try:
            return Priced(opts.pricer.actual(usage, ref, req.provider, tenant=tenant, context=context or req.context),
                          None, usage, ref)
        except (UnknownModelError, ValueError) as err:
            last = err
    raise last or UnknownModelError(str(model), req.provider)


def fill_metrics(ctx: Any, priced: Priced) -> None:
    if ctx is None or priced.usage is None:
        return
    u = priced.usage
    ctx.metrics.tokens_input = int(u.input_tokens)
    ctx.metrics.tokens_output = int(u.output_tokens)
    if priced.model:
        ctx.metrics.model_version = priced.model[:128]
    extra = {k: int(getattr(u, k)) for k in ("cache_read_tokens", "cache_write_tokens") if getattr(u, k)}
    if extra:
        ctx.metrics.custom = {**(ctx.metrics.custom or {}), **extra}


# ---------------------------------------------------------------------- one guarded call


class Call:
    """One reservation around a provider call (sync or async through `enter`/`settle`)."""

    def __init__(self, opts: Options, req: LLMRequest | None, guard: Any, spec: CallSpec, tenant: str | None) -> None:
        self.opts = opts
        self.req = req
        self.guard = guard
        self.spec = spec
        self.tenant = tenant

    @classmethod
    def prepare(cls, opts: Options, req: LLMRequest, *, want_async: bool, arg: Any = None,
                subject_overrides: Mapping[str, Any] | None = None) -> "Call":
        cl = opts.client(want_async)
        spec = build_spec(opts, cl, req if arg is None else arg, estimate=0,
                          action_name=f"{req.provider}:{req.model}", subject_overrides=subject_overrides)
        tenant = spec.subject.tenant  # the operator's per-tenant price table applies to it
        spec.estimate = llm_estimate(opts, req, tenant)
        guard = (AsyncGuard if want_async else SyncGuard)(cl, spec, shadow=opts.is_shadow)
        return cls(opts, req, guard, spec, tenant)

    def priced(self, usage: Any, model: str | None, context: Mapping[str, str] | None = None) -> Priced:
        if usage is None or self.req is None:
            return Priced(self.spec.estimate, "estimate")
        try:
            return price_usage(self.opts, self.req, usage, model, self.tenant, context)
        except Exception as err:  # noqa: BLE001 - the call ran: commit the estimate rather than nothing
            log.warning("pricing %s failed (%s); committing the estimate %d", model, err, self.spec.estimate)
            return Priced(self.spec.estimate, "estimate", usage, model)

    def commit_sync(self, priced: Priced) -> None:
        fill_metrics(self.guard.ctx, priced)
        self.guard.commit(priced.amount, priced.source)

    async def commit_async(self, priced: Priced) -> None:
        fill_metrics(self.guard.ctx, priced)
        await self.guard.commit(priced.amount, priced.source)


# ---------------------------------------------------------------------- streams


class Accumulator:
    """Observes a provider stream's items; knows its usage once the stream reported it."""

    received = False
    complete = False
    model: str | None = None
    context: dict[str, str] | None = None

    def observe(self, item: Any) -> bool:
        """Record an item; False hides it from the caller (a usage chunk the caller did not ask for)."""
        self.received = True
        return True

    def usage(self) -> Any:
        return None


def _stream_outcome(call: Call, acc: Accumulator) -> Priced:
    usage = acc.usage() if acc.complete else None
    return call.priced(usage, acc.model, acc.context)


class SyncStreamProxy:
    """Iterates the provider's stream, settles the reservation when it ends: the priced usage when the
    stream reported it, the estimate (the most it can have cost) when it stopped before, a release when
    it failed before its first item."""

    def __init__(self, inner: Any, call: Call, acc: Accumulator) -> None:
        self._inner = inner
        self._call = call
        self._acc = acc
        self._done = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __iter__(self) -> "SyncStreamProxy":
        return self

    def __next__(self) -> Any:
        while True:
            try:
                item = next(self._inner)
            except StopIteration:
                self._finish(None)
                raise
            except BaseException as err:
                self._finish(err)
                raise
            if self._acc.observe(item):
                return item

    def _finish(self, err: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        if err is not None and not self._acc.received:
            self._call.guard.release("provider_stream_failed")
            return
        self._call.commit_sync(_stream_outcome(self._call, self._acc))

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._finish(None)

    def __del__(self) -> None:
        # Dropped unconsumed and unclosed: stop extending the lease (no I/O here); the reservation then
        # expires at its TTL instead of being held for the life of the process.
        if not getattr(self, "_done", True):
            self._call.guard._stop_heartbeat()

    def __enter__(self) -> "SyncStreamProxy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncStreamProxy:
    def __init__(self, inner: Any, call: Call, acc: Accumulator) -> None:
        self._inner = inner
        self._call = call
        self._acc = acc
        self._done = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __aiter__(self) -> "AsyncStreamProxy":
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                item = await self._inner.__anext__()
            except StopAsyncIteration:
                await self._finish(None)
                raise
            except BaseException as err:
                await self._finish(err)
                raise
            if self._acc.observe(item):
                return item

    async def _finish(self, err: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        if err is not None and not self._acc.received:
            await self._call.guard.release("provider_stream_failed")
            return
        await self._call.commit_async(_stream_outcome(self._call, self._acc))

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            await self._finish(None)

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self._call.guard._stop_heartbeat()

    async def __aenter__(self) -> "AsyncStreamProxy":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# ---------------------------------------------------------------------- wrapping a provider method


def guard_sync(call: Call, send: Callable[[], Any], settle: Callable[[Any], Any]) -> Any:
    """Reserve (typed error on DENY, provider not called), send, then `settle(result)`: it returns the
    value for the caller and commits (or hands the reservation to a stream proxy)."""
    call.guard.enter()
    try:
        result = send()
    except BaseException:
        call.guard.release("provider_call_failed")
        raise
    return settle(result)


async def guard_async(call: Call, send: Callable[[], Any], settle: Callable[[Any], Any]) -> Any:
    await call.guard.enter()
    try:
        result = await send()
    except BaseException:
        await call.guard.release("provider_call_failed")
        raise
    return await settle(result)


def mark(fn: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    fn.__cycles_original__ = original  # type: ignore[attr-defined]
    fn.__wrapped__ = original  # type: ignore[attr-defined]
    return fn


def is_marked(fn: Any) -> bool:
    return hasattr(fn, "__cycles_original__")


__all__ = ["request_subject", "outer_guarded", "outer_guard", "open_outer_guard", "close_outer_guard", "Options", "LLMRequest", "Call", "Priced", "Accumulator", "SyncStreamProxy", "AsyncStreamProxy",
           "guard_sync", "guard_async", "extract_usage", "build_spec", "llm_estimate", "price_usage", "mark",
           "is_marked", "input_tokens"]


def _is_async(resource: Any) -> bool:
    """Whether an SDK resource (openai/anthropic `Completions`, `Messages` ...) is the asyncio flavour: their
    async methods are wrapped by sync decorators, so the class (AsyncAPIResource) tells, not the function."""
    import inspect

    return any(c.__name__.startswith("Async") for c in type(resource).__mro__) or \
        inspect.iscoroutinefunction(getattr(resource, "create", None))
