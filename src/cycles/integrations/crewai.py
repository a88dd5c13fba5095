"""`CyclesLLM`: a CrewAI LLM (`BaseLLM`) wrapping another one; every call reserved before, committed after.

    llm = CyclesLLM(LLM(model="gpt-4o-mini"), workflow="research")
    writer = Agent(role="writer", goal=..., backstory=..., llm=llm)

`call` / `acall` reserve the priced bound of the messages and tool schemas (the wrapped LLM's
`max_tokens`, else `default_max_output_tokens`), raise the SDK's typed error on DENY before the wrapped
LLM is called, and commit the price of the tokens the call added to the wrapped LLM's own usage counters
(CrewAI's `prompt_tokens` / `cached_prompt_tokens` / `cache_creation_tokens` / `completion_tokens`); an
error releases. The provider and model are the wrapped LLM's (`provider=` / `model=` override them).
Those counters are per LLM instance: give each concurrently running agent its own wrapped LLM, or calls
made at the same moment on one instance are priced from each other's tokens (their sum stays right).
"""

from __future__ import annotations

from typing import Any

from crewai.llms.base_llm import BaseLLM
from pydantic import PrivateAttr

from ..client.lifecycle import check_amount
from ..pricing import prompt_token_bound
from ..pricing.usage import Usage
from ._common import Call, LLMRequest, Options, outer_guard

# CrewAI provider names -> genai-prices provider ids
_PROVIDERS = {"gemini": "google", "google": "google", "vertex_ai": "google", "bedrock": "aws",
              "azure": "azure", "xai": "x-ai", "mistral": "mistral"}
_COUNTERS = ("prompt_tokens", "cached_prompt_tokens", "cache_creation_tokens", "completion_tokens")


def usage_between(before: dict[str, int], after: dict[str, int]) -> Usage | None:
    d = {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in _COUNTERS}
    if not (d["prompt_tokens"] or d["completion_tokens"]):
        return None
    return Usage(input_tokens=d["prompt_tokens"], output_tokens=d["completion_tokens"],
                 cache_read_tokens=d["cached_prompt_tokens"] or None, cache_write_tokens=d["cache_creation_tokens"] or None)


class CyclesLLM(BaseLLM):
    llm_type: str = "cycles"
    _inner: Any = PrivateAttr()
    _opts: Options = PrivateAttr()
    _price_provider: str = PrivateAttr()
    _price_model: str = PrivateAttr()

    def __init__(self, llm: BaseLLM, *, provider: str | None = None, model: str | None = None,
                 **options: Any) -> None:
        super().__init__(model=llm.model, provider=llm.provider, max_tokens=llm.max_tokens, stop=list(llm.stop),
                         stream=llm.stream)
        self._inner = llm
        self._opts, _ = Options.of(options)
        self._price_provider = provider or _PROVIDERS.get(str(llm.provider), str(llm.provider or "openai"))
        self._price_model = model or str(llm.model).split("/", 1)[-1]

    @property
    def wrapped(self) -> BaseLLM:
        return self._inner

    def _call(self, messages: Any, tools: Any, want_async: bool) -> Call:
        out = self._inner.max_tokens or self._opts.default_max_output_tokens
        req = LLMRequest(self._price_provider, self._price_model, prompt_token_bound(messages, tools), int(out),
                         {"messages": messages, "tools": tools}, {}, "crewai")
        if self._opts.token_counter is not None:
            req.input_tokens = check_amount(self._opts.token_counter(req), "token_counter result")
        return Call.prepare(self._opts, req, want_async=want_async)

    def _sync_stop(self) -> None:
        if self.stop and self.stop != self._inner.stop:  # the agent sets its stop words on the LLM it holds
            self._inner.stop = list(self.stop)

    def call(self, messages: Any, tools: Any = None, callbacks: Any = None, available_functions: Any = None,
             from_task: Any = None, from_agent: Any = None, response_model: Any = None) -> Any:
        call = self._call(messages, tools, False)
        call.guard.enter()  # DENY raises here: the wrapped LLM is not called
        self._sync_stop()
        before = dict(self._inner._token_usage)
        try:
            with outer_guard():  # an instrumented provider client inside passes through
                result = self._inner.call(messages, tools=tools, callbacks=callbacks,
                                          available_functions=available_functions, from_task=from_task,
                                          from_agent=from_agent, response_model=response_model)
        except BaseException:
            call.guard.release("llm_call_failed")
            raise
        call.commit_sync(call.priced(usage_between(before, self._inner._token_usage), None))
        return result

    async def acall(self, messages: Any, tools: Any = None, callbacks: Any = None, available_functions: Any = None,
                    from_task: Any = None, from_agent: Any = None, response_model: Any = None) -> Any:
        call = self._call(messages, tools, True)
        await call.guard.enter()
        self._sync_stop()
        before = dict(self._inner._token_usage)
        try:
            with outer_guard():
                result = await self._inner.acall(messages, tools=tools, callbacks=callbacks,
                                                 available_functions=available_functions, from_task=from_task,
                                                 from_agent=from_agent, response_model=response_model)
        except BaseException:
            await call.guard.release("llm_call_failed")
            raise
        await call.commit_async(call.priced(usage_between(before, self._inner._token_usage), None))
        return result

    # the rest is the wrapped LLM's
    def supports_function_calling(self) -> bool:
        f = getattr(self._inner, "supports_function_calling", None)
        return bool(f()) if f is not None else False

    def supports_stop_words(self) -> bool:
        return self._inner.supports_stop_words()

    def get_context_window_size(self) -> int:
        return self._inner.get_context_window_size()

    def supports_multimodal(self) -> bool:
        return self._inner.supports_multimodal()

    def get_token_usage_summary(self) -> Any:
        return self._inner.get_token_usage_summary()


__all__ = ["CyclesLLM", "usage_between"]
