"""`CyclesModel`: a Pydantic AI model wrapper that reserves each model request and commits its priced usage.

    agent = Agent(CyclesModel("openai:gpt-4o-mini", tenant="acme"), ...)

Each `request` / `request_stream` reserves the priced bound of the messages and tool definitions
(`model_settings["max_tokens"]` for the output), raises the SDK's typed error on DENY before the wrapped
model is called, and commits the price of the response's `RequestUsage` (cache reads and writes priced as
such). The wrapped model's `system` names the genai-prices provider and its `model_name` the model;
`provider=` / `model=` override them (e.g. for `TestModel`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pydantic_ai.messages import ModelMessagesTypeAdapter
from pydantic_ai.models.wrapper import WrapperModel

from ..client.lifecycle import check_amount
from ..pricing import prompt_token_bound
from ..pricing.usage import Usage
from ._common import Call, LLMRequest, Options, outer_guard

_SYSTEMS = {"google-gla": "google", "google-vertex": "google", "bedrock": "aws", "mistral": "mistral",
            "grok": "x-ai", "xai": "x-ai", "azure": "azure"}


def usage_of(u: Any) -> Usage | None:
    if u is None or not (u.input_tokens or u.output_tokens):
        return None
    return Usage(input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                 cache_read_tokens=u.cache_read_tokens or None, cache_write_tokens=u.cache_write_tokens or None)


def _stream_usage(stream: Any) -> Any:
    u = stream.usage  # a property in recent releases, a method before
    return u if hasattr(u, "input_tokens") else u()


class CyclesModel(WrapperModel):
    def __init__(self, wrapped: Any, *, provider: str | None = None, model: str | None = None, **options: Any) -> None:
        super().__init__(wrapped)
        self.opts, _ = Options.of(options)
        self.price_provider = provider
        self.price_model = model

    def _call(self, messages: list[Any], model_settings: Any, params: Any) -> Call:
        tools = [getattr(t, "parameters_json_schema", None) for t in
                 list(getattr(params, "function_tools", None) or []) + list(getattr(params, "output_tools", None) or [])]
        bound = len(ModelMessagesTypeAdapter.dump_json(messages)) + prompt_token_bound(tools)
        out = (model_settings or {}).get("max_tokens") or self.opts.default_max_output_tokens
        system = self.wrapped.system
        req = LLMRequest(self.price_provider or _SYSTEMS.get(system, system), self.price_model or self.wrapped.model_name,
                         bound, int(out), {"messages": messages, "model_settings": model_settings}, {}, "pydantic_ai")
        if self.opts.token_counter is not None:
            req.input_tokens = check_amount(self.opts.token_counter(req), "token_counter result")
        return Call.prepare(self.opts, req, want_async=True)

    def _model(self, response: Any) -> str | None:
        return None if self.price_model else getattr(response, "model_name", None)

    async def request(self, messages: list[Any], model_settings: Any, model_request_parameters: Any) -> Any:
        call = self._call(messages, model_settings, model_request_parameters)
        await call.guard.enter()  # DENY raises here: the wrapped model is not called
        try:
            with outer_guard():  # an instrumented provider client inside passes through
                response = await self.wrapped.request(messages, model_settings, model_request_parameters)
        except BaseException:
            await call.guard.release("model_request_failed")
            raise
        await call.commit_async(call.priced(usage_of(response.usage), self._model(response)))
        return response

    @asynccontextmanager
    async def request_stream(self, messages: list[Any], model_settings: Any, model_request_parameters: Any,
                             run_context: Any = None) -> AsyncIterator[Any]:
        call = self._call(messages, model_settings, model_request_parameters)
        await call.guard.enter()
        stream = None
        try:
            async with self.wrapped.request_stream(messages, model_settings, model_request_parameters,
                                                   run_context) as stream:
                yield stream
        except BaseException:
            if stream is None or usage_of(_stream_usage(stream)) is None:
                await call.guard.release("model_stream_failed")
            else:  # tokens were produced before it stopped: commit the most it can have cost
                await call.commit_async(call.priced(None, None))
            raise
        await call.commit_async(call.priced(usage_of(_stream_usage(stream)), self._model(stream)))


__all__ = ["CyclesModel", "usage_of"]
