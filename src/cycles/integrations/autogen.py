"""`CyclesChatCompletionClient`: an AutoGen (autogen-core / AgentChat) model client wrapping another one.

    model = CyclesChatCompletionClient(OpenAIChatCompletionClient(model="gpt-4o-mini"), agent="writer")
    agent = AssistantAgent("writer", model_client=model)

`create` and `create_stream` reserve the priced bound of the messages and tools (`max_tokens` from
`extra_create_args`, else `default_max_output_tokens`), raise the SDK's typed error on DENY before the
wrapped client is called, and commit the price of `CreateResult.usage` (prompt / completion tokens; a
`cached` result costs 0). The model is `model=`, else the wrapped client's configured model.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from autogen_core.models import ChatCompletionClient, CreateResult

from ..client.lifecycle import check_amount
from ..pricing import prompt_token_bound
from ..pricing.usage import Usage
from ._common import Call, LLMRequest, Options, Priced, outer_guard


def usage_of(result: Any) -> Usage | None:
    u = getattr(result, "usage", None)
    if u is None or not (u.prompt_tokens or u.completion_tokens):
        return None
    return Usage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens)


def _dump(messages: Sequence[Any], tools: Sequence[Any]) -> list[Any]:
    def one(x: Any) -> Any:
        if hasattr(x, "model_dump"):
            return x.model_dump(mode="json")
        schema = getattr(x, "schema", None)
        return schema if schema is not None else x
    return [one(m) for m in messages] + [one(t) for t in tools]


class CyclesChatCompletionClient(ChatCompletionClient):
    def __init__(self, inner: ChatCompletionClient, *, provider: str = "openai", model: str | None = None,
                 **options: Any) -> None:
        self.inner = inner
        self.opts, _ = Options.of(options)
        self.provider = provider
        self.model = model or (getattr(inner, "_create_args", None) or {}).get("model") or "unknown"

    def _call(self, messages: Sequence[Any], tools: Sequence[Any], extra: Mapping[str, Any]) -> Call:
        out = extra.get("max_tokens") or extra.get("max_completion_tokens") or self.opts.default_max_output_tokens
        req = LLMRequest(self.provider, str(extra.get("model") or self.model), prompt_token_bound(_dump(messages, tools)),
                         int(out), {"messages": messages, "extra_create_args": dict(extra)}, {}, "autogen")
        if self.opts.token_counter is not None:
            req.input_tokens = check_amount(self.opts.token_counter(req), "token_counter result")
        return Call.prepare(self.opts, req, want_async=True)

    def _priced(self, call: Call, result: CreateResult) -> Priced:
        if getattr(result, "cached", False):
            return Priced(0, None)  # answered from AutoGen's cache: no provider call happened
        return call.priced(usage_of(result), None)

    async def create(self, messages: Sequence[Any], *, tools: Sequence[Any] = [], tool_choice: Any = "auto",
                     json_output: Any = None, extra_create_args: Mapping[str, Any] = {},
                     cancellation_token: Any = None) -> CreateResult:
        call = self._call(messages, tools, extra_create_args)
        await call.guard.enter()  # DENY raises here: the wrapped client is not called
        try:
            with outer_guard():  # an instrumented provider client inside passes through
                result = await self.inner.create(messages, tools=tools, tool_choice=tool_choice,
                                                 json_output=json_output, extra_create_args=extra_create_args,
                                                 cancellation_token=cancellation_token)
        except BaseException:
            await call.guard.release("model_request_failed")
            raise
        await call.commit_async(self._priced(call, result))
        return result

    async def create_stream(self, messages: Sequence[Any], *, tools: Sequence[Any] = [], tool_choice: Any = "auto",
                            json_output: Any = None, extra_create_args: Mapping[str, Any] = {},
                            cancellation_token: Any = None) -> AsyncGenerator[Any, None]:
        call = self._call(messages, tools, extra_create_args)
        await call.guard.enter()
        received = False
        final: CreateResult | None = None
        try:
            async for item in self.inner.create_stream(messages, tools=tools, tool_choice=tool_choice,
                                                       json_output=json_output, extra_create_args=extra_create_args,
                                                       cancellation_token=cancellation_token):
                received = True
                if isinstance(item, CreateResult):
                    final = item
                yield item
        except BaseException:
            if not received:
                await call.guard.release("model_stream_failed")
            else:  # tokens were produced: commit the most it can have cost
                await call.commit_async(call.priced(None, None))
            raise
        await call.commit_async(self._priced(call, final) if final is not None else call.priced(None, None))

    # the rest is the wrapped client's
    async def close(self) -> None:
        await self.inner.close()

    def actual_usage(self) -> Any:
        return self.inner.actual_usage()

    def total_usage(self) -> Any:
        return self.inner.total_usage()

    def count_tokens(self, messages: Sequence[Any], *, tools: Sequence[Any] = []) -> int:
        return self.inner.count_tokens(messages, tools=tools)

    def remaining_tokens(self, messages: Sequence[Any], *, tools: Sequence[Any] = []) -> int:
        return self.inner.remaining_tokens(messages, tools=tools)

    @property
    def capabilities(self) -> Any:  # deprecated upstream, still abstract
        return self.inner.model_info

    @property
    def model_info(self) -> Any:
        return self.inner.model_info


__all__ = ["CyclesChatCompletionClient", "usage_of"]
