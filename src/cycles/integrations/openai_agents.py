"""`CyclesRunHooks`: the OpenAI Agents SDK's `RunHooks`, pricing every LLM call and reserving every tool.

    hooks = CyclesRunHooks(tenant="acme", tool_estimates={"get_weather": 20_000})
    result = await Runner.run(agent, "question", hooks=hooks)

`on_llm_start` reserves the priced bound of the turn (instructions + input items, the agent's
`model_settings.max_tokens`) and raises the SDK's typed error on DENY, which the Runner propagates
before the model is called; `on_llm_end` commits the price of `ModelResponse.usage`. A tool is reserved
by its estimate at `on_tool_start` (kind `tool.call`) and committed at `on_tool_end`. The agent's name is
the `agent` scope unless the options set it. The SDK has no LLM-error hook: a reservation whose model
call failed is released at the agent's next LLM start or end, or by `await hooks.release_open()`
(call it when `Runner.run` raises); otherwise it expires at its TTL, charging nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agents import RunHooks

from ..client.guard import AsyncGuard
from ..client.lifecycle import check_amount
from ..pricing import prompt_token_bound
from ..pricing.usage import Usage
from ._common import Call, LLMRequest, Options, build_spec


def usage_of(response: Any) -> Usage | None:
    u = getattr(response, "usage", None)
    if u is None or not (u.input_tokens or u.output_tokens):
        return None
    cached = getattr(getattr(u, "input_tokens_details", None), "cached_tokens", 0) or 0
    written = getattr(getattr(u, "input_tokens_details", None), "cache_write_tokens", 0) or 0
    return Usage(input_tokens=u.input_tokens, output_tokens=u.output_tokens, cache_read_tokens=cached or None,
                 cache_write_tokens=written or None)


def _model_name(agent: Any, override: str | None) -> str:
    if override:
        return override
    model = getattr(agent, "model", None)
    if isinstance(model, str) and model:
        return model
    name = getattr(model, "model", None)
    if isinstance(name, str) and name:
        return name
    try:
        from agents.models import get_default_model

        return get_default_model()
    except Exception:  # noqa: BLE001
        return "unknown"


class CyclesRunHooks(RunHooks):
    def __init__(self, *, provider: str = "openai", model: str | None = None,
                 tool_estimates: dict[str, int] | None = None, default_tool_estimate: int = 0,
                 agent_scope: bool = True, **options: Any) -> None:
        self.opts, _ = Options.of(options)
        self.provider = provider
        self.model = model
        self.tool_estimates = {k: check_amount(v, f"tool_estimates[{k!r}]") for k, v in (tool_estimates or {}).items()}
        self.default_tool_estimate = check_amount(default_tool_estimate, "default_tool_estimate")
        self.agent_scope = agent_scope
        self._llm: dict[tuple[int, int], Call] = {}
        self._tools: dict[tuple[int, int, str], list[Call]] = {}

    def _scope(self, agent: Any) -> dict[str, Any]:
        return {"agent": agent.name} if self.agent_scope and getattr(agent, "name", None) else {}

    async def _drop(self, call: Call | None, reason: str) -> None:
        if call is not None:
            await call.guard.release(reason)

    async def on_llm_start(self, context: Any, agent: Any, system_prompt: str | None, input_items: list[Any]) -> None:
        key = (id(context), id(agent))
        await self._drop(self._llm.pop(key, None), "llm_call_failed")  # the previous call never ended
        settings = getattr(agent, "model_settings", None)
        out = getattr(settings, "max_tokens", None) or self.opts.default_max_output_tokens
        bound = prompt_token_bound(system_prompt, input_items, [getattr(t, "params_json_schema", None)
                                                                for t in getattr(agent, "tools", []) or []])
        req = LLMRequest(self.provider, _model_name(agent, self.model), bound, int(out),
                         {"agent": getattr(agent, "name", None), "input": input_items}, {}, "agents")
        if self.opts.token_counter is not None:
            req.input_tokens = check_amount(self.opts.token_counter(req), "token_counter result")
        call = Call.prepare(self.opts, req, want_async=True, subject_overrides=self._scope(agent))
        await call.guard.enter()  # DENY raises the typed error: the Runner stops before the model call
        self._llm[key] = call

    async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
        call = self._llm.pop((id(context), id(agent)), None)
        if call is not None:
            await call.commit_async(call.priced(usage_of(response), None))

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        name = getattr(tool, "name", None) or type(tool).__name__
        cl = self.opts.client(True)
        info = {"tool": name, "agent": getattr(agent, "name", None)}
        spec = build_spec(self.opts.with_(action_name=None), cl, info,
                          estimate=self.tool_estimates.get(name, self.default_tool_estimate), action_kind="tool.call",
                          action_name=name, subject_overrides=self._scope(agent))
        call = Call(self.opts, None, AsyncGuard(cl, spec, shadow=self.opts.is_shadow), spec, None)
        await call.guard.enter()
        self._tools.setdefault((id(context), id(agent), name), []).append(call)

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
        name = getattr(tool, "name", None) or type(tool).__name__
        calls = self._tools.get((id(context), id(agent), name))
        if calls:
            call = calls.pop(0)
            await call.guard.commit(call.spec.estimate, None)

    async def on_agent_end(self, context: Any, agent: Any, output: Any) -> None:
        await self._drop(self._llm.pop((id(context), id(agent)), None), "llm_call_failed")

    async def release_open(self, reason: str = "run_failed") -> None:
        """Release every reservation still open (the run raised between a start and its end)."""
        calls = list(self._llm.values()) + [c for cs in self._tools.values() for c in cs]
        self._llm.clear()
        self._tools.clear()
        await asyncio.gather(*(c.guard.release(reason) for c in calls), return_exceptions=True)


__all__ = ["CyclesRunHooks", "usage_of"]
