"""`CyclesLLM`: a LlamaIndex LLM wrapping another one; every call reserved before, committed after.

    llm = CyclesLLM(Anthropic(model="claude-sonnet-4-5"), workflow="rag")
    agent = FunctionAgent(tools=[...], llm=llm)        # or Settings.llm = llm, a query engine's llm=...

`chat` / `complete`, their `stream_` and async (`a...`) variants, and so the function-calling helpers
(`chat_with_tools`, `astream_chat_with_tools` that agents use) reserve the priced bound of the messages and
tool schemas (`max_tokens` of the call, else the wrapped LLM's `max_tokens` / `metadata.num_output`), raise
the SDK's typed error on DENY before the wrapped LLM is called, and commit the price of the usage the
provider reported: the response's `raw` usage (OpenAI's `prompt_tokens`/`cached_tokens`, Anthropic's
`input_tokens`/`cache_*_input_tokens`), else the token counts LlamaIndex put in `additional_kwargs`; with
none, the estimate. A stream commits from its last usage-bearing chunk. An error releases. The genai-prices
provider comes from the wrapped LLM's package (`llama_index.llms.anthropic` -> `anthropic`), the model from
its `metadata.model_name`; `provider=` / `model=` override them.
"""

from __future__ import annotations

from typing import Any, Sequence

from llama_index.core.base.llms.types import LLMMetadata
from llama_index.core.llms.function_calling import FunctionCallingLLM
from pydantic import PrivateAttr

from ..client.lifecycle import check_amount
from ..pricing import prompt_token_bound
from ..pricing.usage import Usage, extract_usage
from ._common import (Accumulator, AsyncStreamProxy, Call, LLMRequest, Options, SyncStreamProxy, outer_guard)

# llama_index.llms.<package> -> genai-prices provider id
_PACKAGES = {"openai": "openai", "azure_openai": "azure", "anthropic": "anthropic", "gemini": "google",
             "google_genai": "google", "vertex": "google", "bedrock": "aws", "bedrock_converse": "aws",
             "mistralai": "mistral", "groq": "groq", "deepseek": "deepseek", "fireworks": "fireworks",
             "together": "together", "cohere": "cohere", "perplexity": "perplexity", "openrouter": "openrouter",
             "x_ai": "x-ai"}
_MEDIA = {"image", "audio", "video", "document"}


def provider_of(llm: Any) -> str:
    parts = type(llm).__module__.split(".")
    if parts[:2] == ["llama_index", "llms"] and len(parts) > 2:
        return _PACKAGES.get(parts[2], parts[2])
    return "openai"


def _messages(messages: Sequence[Any]) -> list[Any]:
    out = []
    for m in messages:
        parts: list[Any] = []
        for b in getattr(m, "blocks", None) or []:
            kind = getattr(b, "block_type", None)
            if kind == "text":
                parts.append(b.text)
            elif kind in _MEDIA:
                parts.append({"type": "image"})  # prompt_token_bound counts media at its image bound
            else:
                parts.append(b.model_dump(mode="json", exclude_none=True) if hasattr(b, "model_dump") else str(b))
        out.append({"role": str(getattr(m, "role", "user")), "content": parts,
                    "extra": getattr(m, "additional_kwargs", None) or None})
    return out


def _as_dict(x: Any) -> dict[str, Any] | None:
    if x is None:
        return None
    if hasattr(x, "model_dump"):
        return x.model_dump(mode="json", exclude_none=True)
    if isinstance(x, dict):
        return {k: v for k, v in x.items() if v is not None}
    return None


def _priceable(u: dict[str, Any] | None, model: str) -> Usage | None:
    """genai-prices Usage from a usage dict in OpenAI's or Anthropic's shape (None when it has no tokens)."""
    if not u:
        return None
    if "prompt_tokens" in u or "completion_tokens" in u:
        usage = extract_usage({"model": model, "usage": u}, "openai", "chat")
    elif "input_tokens_details" in u:
        usage = extract_usage({"model": model, "usage": u}, "openai", "responses")
    elif "input_tokens" in u or "output_tokens" in u:
        usage = extract_usage({"model": model, "usage": u}, "anthropic")
    else:
        return None
    return usage if (usage.input_tokens or usage.output_tokens) else None


def usage_of(response: Any, model: str) -> tuple[Usage | None, str | None]:
    """The usage a LlamaIndex ChatResponse / CompletionResponse carries, and the model that answered."""
    raw = getattr(response, "raw", None)
    raw_d = raw if isinstance(raw, dict) else None
    got = raw_d.get("usage") if raw_d is not None else getattr(raw, "usage", None)
    answered = (raw_d.get("model") if raw_d is not None else getattr(raw, "model", None)) or None
    answered = answered if isinstance(answered, str) else None
    candidates = [_as_dict(got)]
    msg = getattr(response, "message", None)
    if msg is not None:
        candidates.append(_as_dict((getattr(msg, "additional_kwargs", None) or {}).get("usage")))
    candidates.append(_as_dict(getattr(response, "additional_kwargs", None)))
    for u in candidates:
        usage = _priceable(u, answered or model)
        if usage is not None:
            return usage, answered
    return None, answered


class _StreamUsage(Accumulator):
    """The usage of a LlamaIndex stream: its last chunk that carried one (a provider reports it once, at
    the end: OpenAI's usage chunk, Anthropic's message_delta)."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._usage: Usage | None = None

    def observe(self, chunk: Any) -> bool:
        self.received = True
        usage, answered = usage_of(chunk, self._model)
        if usage is not None:
            self._usage, self.model, self.complete = usage, answered, True
        return True

    def usage(self) -> Any:
        return self._usage


class _AsyncGenProxy(AsyncStreamProxy):
    async def close(self) -> None:  # an async generator closes with aclose
        try:
            await self._inner.aclose()
        finally:
            await self._finish(None)

    aclose = close


class CyclesLLM(FunctionCallingLLM):
    _inner: Any = PrivateAttr()
    _opts: Options = PrivateAttr()
    _price_provider: str = PrivateAttr()
    _price_model: str | None = PrivateAttr()

    def __init__(self, llm: Any, *, provider: str | None = None, model: str | None = None, **options: Any) -> None:
        super().__init__(callback_manager=llm.callback_manager)
        self._inner = llm
        self._opts, _ = Options.of(options)
        self._price_provider = provider or provider_of(llm)
        self._price_model = model

    @classmethod
    def class_name(cls) -> str:
        return "CyclesLLM"

    @property
    def wrapped(self) -> Any:
        return self._inner

    @property
    def metadata(self) -> LLMMetadata:
        return self._inner.metadata

    # ------------------------------------------------------------------ the reservation

    def _model(self) -> str:
        return self._price_model or str(self._inner.metadata.model_name)

    def _call(self, prompt: Any, kwargs: dict[str, Any], want_async: bool, operation: str) -> Call:
        md = self._inner.metadata
        out = kwargs.get("max_tokens") or getattr(self._inner, "max_tokens", None) \
            or (md.num_output if md.num_output and md.num_output > 0 else None) or self._opts.default_max_output_tokens
        bound = prompt_token_bound(prompt, kwargs.get("tools"), getattr(self._inner, "system_prompt", None))
        req = LLMRequest(self._price_provider, self._model(), bound, int(out), kwargs, {}, operation)
        if self._opts.token_counter is not None:
            req.input_tokens = check_amount(self._opts.token_counter(req), "token_counter result")
        return Call.prepare(self._opts, req, want_async=want_async)

    def _priced(self, call: Call, response: Any) -> Any:
        usage, answered = usage_of(response, self._model())
        return call.priced(usage, None if self._price_model else answered)

    def _run(self, prompt: Any, kwargs: dict[str, Any], op: str, send: Any, stream: bool) -> Any:
        call = self._call(prompt, kwargs, False, op)
        call.guard.enter()  # DENY raises here: the wrapped LLM is not called
        try:
            with outer_guard():  # an instrumented provider client inside passes through
                result = send()
        except BaseException:
            call.guard.release("llm_call_failed")
            raise
        if stream:
            return SyncStreamProxy(result, call, _StreamUsage(self._model()))
        call.commit_sync(self._priced(call, result))
        return result

    async def _arun(self, prompt: Any, kwargs: dict[str, Any], op: str, send: Any, stream: bool) -> Any:
        call = self._call(prompt, kwargs, True, op)
        await call.guard.enter()
        try:
            with outer_guard():
                result = await send()
        except BaseException:
            await call.guard.release("llm_call_failed")
            raise
        if stream:
            return _AsyncGenProxy(result, call, _StreamUsage(self._model()))
        await call.commit_async(self._priced(call, result))
        return result

    # ------------------------------------------------------------------ LLM

    def chat(self, messages: Sequence[Any], **kwargs: Any) -> Any:
        return self._run(_messages(messages), kwargs, "chat", lambda: self._inner.chat(messages, **kwargs), False)

    def stream_chat(self, messages: Sequence[Any], **kwargs: Any) -> Any:
        return self._run(_messages(messages), kwargs, "chat",
                         lambda: self._inner.stream_chat(messages, **kwargs), True)

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        return self._run(prompt, kwargs, "complete", lambda: self._inner.complete(prompt, formatted, **kwargs), False)

    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        return self._run(prompt, kwargs, "complete",
                         lambda: self._inner.stream_complete(prompt, formatted, **kwargs), True)

    async def achat(self, messages: Sequence[Any], **kwargs: Any) -> Any:
        return await self._arun(_messages(messages), kwargs, "chat", lambda: self._inner.achat(messages, **kwargs),
                                False)

    async def astream_chat(self, messages: Sequence[Any], **kwargs: Any) -> Any:
        return await self._arun(_messages(messages), kwargs, "chat",
                                lambda: self._inner.astream_chat(messages, **kwargs), True)

    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        return await self._arun(prompt, kwargs, "complete",
                                lambda: self._inner.acomplete(prompt, formatted, **kwargs), False)

    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        return await self._arun(prompt, kwargs, "complete",
                                lambda: self._inner.astream_complete(prompt, formatted, **kwargs), True)

    # ------------------------------------------------------------------ function calling: the wrapped LLM's

    def _prepare_chat_with_tools(self, tools: Sequence[Any], user_msg: Any = None, chat_history: Any = None,
                                 verbose: bool = False, allow_parallel_tool_calls: bool = False,
                                 tool_required: bool = False, **kwargs: Any) -> dict[str, Any]:
        return self._inner._prepare_chat_with_tools_compat(
            tools, user_msg=user_msg, chat_history=chat_history, verbose=verbose,
            allow_parallel_tool_calls=allow_parallel_tool_calls, tool_required=tool_required, **kwargs)

    def _validate_chat_with_tools_response(self, response: Any, tools: Sequence[Any],
                                           allow_parallel_tool_calls: bool = False, **kwargs: Any) -> Any:
        return self._inner._validate_chat_with_tools_response(
            response, tools, allow_parallel_tool_calls=allow_parallel_tool_calls, **kwargs)

    def get_tool_calls_from_response(self, response: Any, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> Any:
        return self._inner.get_tool_calls_from_response(response, error_on_no_tool_call=error_on_no_tool_call,
                                                        **kwargs)


__all__ = ["CyclesLLM", "usage_of", "provider_of"]
