"""`instrument(client, **options)`: an `anthropic.Anthropic` / `AsyncAnthropic` whose `messages.create`
(also `stream=True`) and `messages.stream(...)` reserve the priced upper bound of the request (prompt
bound + `max_tokens`), call the provider only on ALLOW, and commit the price of the reported usage
(cache reads and writes priced as such). A tool-use loop is one reservation per `messages.create` call.
"""

from __future__ import annotations

from typing import Any

from ..pricing import prompt_token_bound
from ._common import (Accumulator, AsyncStreamProxy, Call, LLMRequest, Options, Priced, SyncStreamProxy,
                      _is_async, extract_usage, guard_async, guard_sync, input_tokens, is_marked, mark,
                      outer_guarded)

PROVIDER = "anthropic"


def _given(kwargs: dict[str, Any], name: str) -> Any:
    v = kwargs.get(name)
    return v if v is not None and type(v).__name__ not in ("Omit", "NotGiven") else None


def messages_request(opts: Options, provider: str, kwargs: dict[str, Any]) -> LLMRequest:
    bound = prompt_token_bound(_given(kwargs, "system"), _given(kwargs, "messages"), _given(kwargs, "tools"))
    out = _given(kwargs, "max_tokens") or opts.default_max_output_tokens
    ctx = {"speed": "fast"} if _given(kwargs, "speed") == "fast" else {}
    req = LLMRequest(provider, str(kwargs.get("model")), bound, int(out), kwargs, ctx, "messages")
    req.input_tokens = input_tokens(opts, req, bound)
    return req


def _usage_of(model: Any, usage: Any) -> Any:
    if usage is None:
        return None
    raw = usage.model_dump(mode="json", exclude_none=True) if hasattr(usage, "model_dump") else dict(usage)
    return extract_usage({"model": model, "usage": raw}, PROVIDER)


class EventAccumulator(Accumulator):
    """Usage of a raw `messages.create(stream=True)` stream: message_start's, updated by message_delta's."""

    def __init__(self) -> None:
        self._usage: dict[str, Any] = {}

    def observe(self, event: Any) -> bool:
        self.received = True
        kind = getattr(event, "type", None)
        if kind == "message_start":
            self.model = event.message.model
            self._usage = event.message.usage.model_dump(mode="json", exclude_none=True)
        elif kind == "message_delta" and getattr(event, "usage", None) is not None:
            self._usage.update(event.usage.model_dump(mode="json", exclude_none=True))
            self.complete = True
        return True

    def usage(self) -> Any:
        return extract_usage({"model": self.model, "usage": self._usage}, PROVIDER) if self._usage else None


def _snapshot_priced(call: Call, stream: Any) -> Priced | None:
    """Priced usage of a `messages.stream` helper once its message ended (stop_reason set), else None."""
    snap_of = getattr(stream, "_current_snapshot_or_none", None)
    snap = snap_of() if snap_of is not None else None
    if snap is None or getattr(snap, "stop_reason", None) is None:
        return None
    return call.priced(_usage_of(snap.model, snap.usage), snap.model)


class _StreamManager:
    """Stands for the `MessageStreamManager` of `messages.stream(...)`: reserves on enter (before the request
    is sent), settles on exit from the accumulated message."""

    def __init__(self, open_inner: Any, call: Call) -> None:
        self._open = open_inner
        self._call = call
        self._inner: Any = None
        self._stream: Any = None

    def __enter__(self) -> Any:
        self._call.guard.enter()
        try:
            self._inner = self._open()
            self._stream = self._inner.__enter__()
        except BaseException:
            self._call.guard.release("provider_call_failed")
            raise
        return self._stream

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._inner.__exit__(exc_type, exc, tb)
        finally:
            priced = _snapshot_priced(self._call, self._stream)
            if priced is None and exc_type is not None and self._stream._current_snapshot_or_none() is None:
                self._call.guard.release("provider_stream_failed")
            else:
                self._call.commit_sync(priced or self._call.priced(None, None))

    async def __aenter__(self) -> Any:
        await self._call.guard.enter()
        try:
            self._inner = self._open()
            self._stream = await self._inner.__aenter__()
        except BaseException:
            await self._call.guard.release("provider_call_failed")
            raise
        return self._stream

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            await self._inner.__aexit__(exc_type, exc, tb)
        finally:
            priced = _snapshot_priced(self._call, self._stream)
            if priced is None and exc_type is not None and self._stream._current_snapshot_or_none() is None:
                await self._call.guard.release("provider_stream_failed")
            else:
                await self._call.commit_async(priced or self._call.priced(None, None))


def _wrap_create(original: Any, opts: Options, provider: str, is_async: bool) -> Any:
    def priced(call: Call, message: Any) -> Priced:
        return call.priced(_usage_of(getattr(message, "model", None), getattr(message, "usage", None)),
                           getattr(message, "model", None))

    if is_async:
        async def create_async(*args: Any, **kwargs: Any) -> Any:
            if outer_guarded():  # a framework integration already reserved this call
                return await original(*args, **kwargs)
            call = Call.prepare(opts, messages_request(opts, provider, kwargs), want_async=True)
            stream = kwargs.get("stream") is True

            async def settle(result: Any) -> Any:
                if stream:
                    return AsyncStreamProxy(result, call, EventAccumulator())
                await call.commit_async(priced(call, result))
                return result

            return await guard_async(call, lambda: original(*args, **kwargs), settle)

        return mark(create_async, original)

    def create(*args: Any, **kwargs: Any) -> Any:
        if outer_guarded():
            return original(*args, **kwargs)
        call = Call.prepare(opts, messages_request(opts, provider, kwargs), want_async=False)
        stream = kwargs.get("stream") is True

        def settle(result: Any) -> Any:
            if stream:
                return SyncStreamProxy(result, call, EventAccumulator())
            call.commit_sync(priced(call, result))
            return result

        return guard_sync(call, lambda: original(*args, **kwargs), settle)

    return mark(create, original)


def _wrap_stream(original: Any, opts: Options, provider: str, is_async: bool) -> Any:
    def stream(*args: Any, **kwargs: Any) -> Any:
        if outer_guarded():
            return original(*args, **kwargs)
        call = Call.prepare(opts, messages_request(opts, provider, kwargs), want_async=is_async)
        return _StreamManager(lambda: original(*args, **kwargs), call)

    return mark(stream, original)


def instrument(client: Any, **options: Any) -> Any:
    """Guard `client` (an `anthropic.Anthropic` or `AsyncAnthropic`, also Bedrock/Vertex clients with a
    `provider=`) in place and return it."""
    opts, rest = Options.of(options, extra=("provider",))
    provider = rest.get("provider") or PROVIDER
    messages = client.messages
    if is_marked(messages.create):
        raise ValueError("this client is already instrumented")
    is_async = _is_async(messages)
    messages.stream = _wrap_stream(messages.stream, opts, provider, is_async)
    messages.create = _wrap_create(messages.create, opts, provider, is_async)
    return client


def uninstrument(client: Any) -> Any:
    for name in ("create", "stream"):
        if is_marked(getattr(client.messages, name)):
            delattr(client.messages, name)
    return client


__all__ = ["instrument", "uninstrument", "EventAccumulator"]
