"""`instrument(client, **options)`: an `openai.OpenAI` / `AsyncOpenAI` whose `chat.completions.create`,
`chat.completions.parse` and `responses.create` (sync, async, `stream=True`) reserve the priced upper bound
of the request, call the provider only on ALLOW, and commit the price of the usage the provider reported.

    client = instrument(OpenAI(), tenant="acme")      # same object, guarded in place
    client.chat.completions.create(model="gpt-4o-mini", messages=[...], max_tokens=200)

A chat stream asks for its usage chunk (`stream_options={"include_usage": True}`) when the caller did not,
and hides that extra chunk from the caller. Options: see `cycles.integrations.Options` and `provider=`
(genai-prices provider id; default: from the client's base_url, else "openai").
"""

from __future__ import annotations

import re
from typing import Any

from ..pricing import prompt_token_bound
from ._common import (Accumulator, AsyncStreamProxy, Call, LLMRequest, Options, SyncStreamProxy, extract_usage,
                      _is_async, guard_async, guard_sync, input_tokens, is_marked, mark, outer_guarded)

_IGNORED_TIERS = {None, "auto", "default"}


def _provider_for(base_url: Any) -> str:
    from genai_prices import data_snapshot

    url = str(base_url or "")
    for p in data_snapshot.get_snapshot().providers:
        if p.id != "openai" and p.api_pattern and re.match(p.api_pattern, url):
            return p.id
    return "openai"


def _given(kwargs: dict[str, Any], name: str) -> Any:
    v = kwargs.get(name)
    # openai's `omit`/`NOT_GIVEN` sentinels are falsy objects that are not None
    return v if v is not None and (v or v == 0) and type(v).__name__ not in ("Omit", "NotGiven") else None


def _tier(value: Any) -> dict[str, str]:
    return {} if value in _IGNORED_TIERS or not isinstance(value, str) else {"service_tier": value}


def chat_request(opts: Options, provider: str, kwargs: dict[str, Any]) -> LLMRequest:
    bound = prompt_token_bound(_given(kwargs, "messages"), _given(kwargs, "tools"), _given(kwargs, "functions"),
                               _given(kwargs, "response_format"))
    out = _given(kwargs, "max_completion_tokens") or _given(kwargs, "max_tokens") or opts.default_max_output_tokens
    req = LLMRequest(provider, str(kwargs.get("model")), bound, int(out) * int(_given(kwargs, "n") or 1), kwargs,
                     _tier(_given(kwargs, "service_tier")), "chat.completions")
    req.input_tokens = input_tokens(opts, req, bound)
    return req


def responses_request(opts: Options, provider: str, kwargs: dict[str, Any]) -> LLMRequest:
    bound = prompt_token_bound(_given(kwargs, "instructions"), _given(kwargs, "input"), _given(kwargs, "tools"),
                               _given(kwargs, "text"))
    out = _given(kwargs, "max_output_tokens") or opts.default_max_output_tokens
    req = LLMRequest(provider, str(kwargs.get("model")), bound, int(out), kwargs,
                     _tier(_given(kwargs, "service_tier")), "responses")
    req.input_tokens = input_tokens(opts, req, bound)
    return req


def _usage(result: Any, flavor: str) -> Any:
    usage = getattr(result, "usage", None)
    if usage is None:
        return None
    return extract_usage({"model": getattr(result, "model", None), "usage": usage.model_dump(mode="json")}, "openai",
                         flavor)


class ChatAccumulator(Accumulator):
    def __init__(self, hide_usage_chunk: bool) -> None:
        self.hide = hide_usage_chunk
        self._usage: Any = None
        self.context: dict[str, str] | None = None

    def observe(self, chunk: Any) -> bool:
        self.received = True
        self.model = getattr(chunk, "model", None) or self.model
        tier = _tier(getattr(chunk, "service_tier", None))
        if tier:
            self.context = tier
        if getattr(chunk, "usage", None) is not None:
            self._usage = chunk
            self.complete = True
            return not (self.hide and not chunk.choices)
        return True

    def usage(self) -> Any:
        return _usage(self._usage, "chat") if self._usage is not None else None


class ResponsesAccumulator(Accumulator):
    def __init__(self) -> None:
        self._response: Any = None
        self.context: dict[str, str] | None = None

    def observe(self, event: Any) -> bool:
        self.received = True
        resp = getattr(event, "response", None)
        if resp is not None:
            self.model = getattr(resp, "model", None) or self.model
            if getattr(event, "type", "") in ("response.completed", "response.incomplete", "response.failed") \
                    and getattr(resp, "usage", None) is not None:
                self._response = resp
                self.complete = True
                self.context = _tier(getattr(resp, "service_tier", None)) or None
        return True

    def usage(self) -> Any:
        return _usage(self._response, "responses") if self._response is not None else None


def _wrap(original: Any, opts: Options, provider: str, kind: str, is_async: bool) -> Any:
    build = chat_request if kind != "responses" else responses_request
    flavor = "chat" if kind != "responses" else "responses"

    def prepare(kwargs: dict[str, Any]) -> tuple[Call, bool, bool]:
        req = build(opts, provider, kwargs)
        stream = kwargs.get("stream") is True
        hide = False
        if stream and kind == "chat":
            so = _given(kwargs, "stream_options") or {}
            if not so.get("include_usage"):
                kwargs["stream_options"] = {**so, "include_usage": True}
                hide = True
        return Call.prepare(opts, req, want_async=is_async), stream, hide

    def accumulator(hide: bool) -> Accumulator:
        return ResponsesAccumulator() if kind == "responses" else ChatAccumulator(hide)

    def priced(call: Call, result: Any) -> Any:
        if hasattr(result, "http_response") and callable(getattr(result, "parse", None)):
            result = result.parse()  # `with_raw_response` (LangChain's ChatOpenAI uses it): price what it parses to
        return call.priced(_usage(result, flavor), getattr(result, "model", None),
                           _tier(getattr(result, "service_tier", None)) or None)

    if is_async:
        async def guarded_async(*args: Any, **kwargs: Any) -> Any:
            if outer_guarded():  # a framework integration already reserved this call
                return await original(*args, **kwargs)
            call, stream, hide = prepare(kwargs)

            async def settle(result: Any) -> Any:
                if stream:
                    return AsyncStreamProxy(result, call, accumulator(hide))
                await call.commit_async(priced(call, result))
                return result

            return await guard_async(call, lambda: original(*args, **kwargs), settle)

        return mark(guarded_async, original)

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if outer_guarded():
            return original(*args, **kwargs)
        call, stream, hide = prepare(kwargs)

        def settle(result: Any) -> Any:
            if stream:
                return SyncStreamProxy(result, call, accumulator(hide))
            call.commit_sync(priced(call, result))
            return result

        return guard_sync(call, lambda: original(*args, **kwargs), settle)

    return mark(guarded, original)


def instrument(client: Any, **options: Any) -> Any:
    """Guard `client` (an `openai.OpenAI` or `openai.AsyncOpenAI`, also Azure) in place and return it."""
    opts, rest = Options.of(options, extra=("provider",))
    provider = rest.get("provider") or _provider_for(getattr(client, "base_url", None))
    completions = client.chat.completions
    if is_marked(completions.create):
        raise ValueError("this client is already instrumented")
    is_async = _is_async(completions)
    completions.create = _wrap(completions.create, opts, provider, "chat", is_async)
    if hasattr(completions, "parse"):
        completions.parse = _wrap(completions.parse, opts, provider, "chat", is_async)
    responses = getattr(client, "responses", None)
    if responses is not None:
        responses.create = _wrap(responses.create, opts, provider, "responses", is_async)
    return client


def uninstrument(client: Any) -> Any:
    """Undo `instrument` (the provider methods are the client's own again)."""
    for owner in (client.chat.completions, getattr(client, "responses", None)):
        for name in ("create", "parse"):
            fn = getattr(owner, name, None) if owner is not None else None
            if fn is not None and is_marked(fn):
                delattr(owner, name)
    return client


__all__ = ["instrument", "uninstrument", "ChatAccumulator", "ResponsesAccumulator"]
