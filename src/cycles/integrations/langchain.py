"""`CyclesCallbackHandler`: LangChain chat models and tools, reserved before they run, committed after.

    handler = CyclesCallbackHandler(tenant="acme", tool_estimates={"search": 50_000})
    model.invoke(messages, config={"callbacks": [handler]})          # or graph.invoke(..., config=...)

A chat model start reserves the priced bound of its messages (`ls_provider` / `ls_model_name` /
`ls_max_tokens`, which LangChain puts in the run's metadata; `provider=` / `model=` override them) and a
denial raises the SDK's typed error before the model is called (`raise_error = True`). The end commits
the price of the message's `usage_metadata` (cache reads/writes priced as such); an error releases.
A tool start reserves its per-tool estimate (action kind `tool.call`), its end commits it.
Inside LangGraph the node name (`langgraph_node`) becomes the `agent` scope (`node_scope="workflow"` to
use that level instead, None to ignore it) unless the option sets that level.
The handler is synchronous and thread-safe. A chat model run marks its context as reserved, so a provider
client instrumented with `cycles.integrations.openai` / `.anthropic` inside the model (e.g.
`ChatOpenAI(root_client=instrument(OpenAI()), ...)`) passes through instead of charging the call twice.
For that mark to reach the model under `ainvoke`, the handler runs inline (LangChain's `run_inline`): its
reserve and commit are made on the event loop's thread. `run_inline=False` moves them to LangChain's worker
threads, where the mark cannot reach the model: then do not also instrument the model's client.
"""

from __future__ import annotations

import threading
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from ..client.lifecycle import check_amount
from ..client.guard import SyncGuard
from ..pricing import prompt_token_bound
from ..pricing.usage import Usage
from ._common import Call, LLMRequest, Options, build_spec, close_outer_guard, open_outer_guard

_PROVIDERS = {"openai": "openai", "azure": "azure", "azure_openai": "azure", "anthropic": "anthropic",
              "google_genai": "google", "google_vertexai": "google", "groq": "groq", "mistralai": "mistral",
              "bedrock": "aws", "amazon_bedrock": "aws", "deepseek": "deepseek", "xai": "x-ai", "fireworks": "fireworks",
              "together": "together", "cohere": "cohere", "perplexity": "perplexity"}


def _text(messages: Any) -> list[Any]:
    out = []
    for batch in messages or []:
        for m in batch:
            out.append({"role": getattr(m, "type", "user"), "content": getattr(m, "content", m)})
    return out


def usage_of(message: Any) -> Usage | None:
    """genai-prices Usage from a LangChain AIMessage's `usage_metadata` (its input_tokens include cache)."""
    um = getattr(message, "usage_metadata", None)
    if not um:
        return None
    details = um.get("input_token_details") or {}
    return Usage(input_tokens=int(um.get("input_tokens") or 0), output_tokens=int(um.get("output_tokens") or 0),
                 cache_read_tokens=details.get("cache_read") or None,
                 cache_write_tokens=details.get("cache_creation") or None)


class CyclesCallbackHandler(BaseCallbackHandler):
    raise_error = True  # a denial must stop the run, not be logged and ignored

    def __init__(self, *, provider: str | None = None, model: str | None = None,
                 tool_estimates: dict[str, int] | None = None, default_tool_estimate: int = 0,
                 node_scope: str | None = "agent", run_inline: bool = True, **options: Any) -> None:
        super().__init__()
        self.run_inline = run_inline
        self.opts, _ = Options.of(options)
        self.provider = provider
        self.model = model
        self.tool_estimates = {k: check_amount(v, f"tool_estimates[{k!r}]") for k, v in (tool_estimates or {}).items()}
        self.default_tool_estimate = check_amount(default_tool_estimate, "default_tool_estimate")
        if node_scope not in (None, "workflow", "agent", "toolset", "app", "workspace"):
            raise ValueError("node_scope must be None or a subject level below tenant")
        self.node_scope = node_scope
        self._calls: dict[UUID, Call] = {}
        self._marks: dict[UUID, Any] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ helpers

    def _scope_from(self, metadata: dict[str, Any] | None) -> dict[str, Any]:
        node = (metadata or {}).get("langgraph_node")
        return {self.node_scope: str(node)} if node and self.node_scope else {}

    def _take(self, run_id: UUID) -> Call | None:
        with self._lock:
            close_outer_guard(self._marks.pop(run_id, None))
            return self._calls.pop(run_id, None)

    def _start(self, run_id: UUID, call: Call) -> None:
        call.guard.enter()  # raises the typed error on DENY: LangChain re-raises it (raise_error)
        with self._lock:
            self._calls[run_id] = call

    # ------------------------------------------------------------------ chat models

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], *, run_id: UUID,
                            parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        md = metadata or {}
        params = kwargs.get("invocation_params") or {}
        provider = self.provider or _PROVIDERS.get(str(md.get("ls_provider")), md.get("ls_provider")) or "openai"
        model = self.model or md.get("ls_model_name") or params.get("model") or params.get("model_name") or "unknown"
        out = md.get("ls_max_tokens") or params.get("max_tokens") or params.get("max_completion_tokens") \
            or self.opts.default_max_output_tokens
        bound = prompt_token_bound(_text(messages), params.get("tools"))
        req = LLMRequest(str(provider), str(model), bound, int(out), {"metadata": md, "params": params}, {}, "chat")
        if self.opts.token_counter is not None:
            req.input_tokens = check_amount(self.opts.token_counter(req), "token_counter result")
        self._start(run_id, Call.prepare(self.opts, req, want_async=False, subject_overrides=self._scope_from(md)))
        mark = open_outer_guard()  # this context's model call is reserved: instrumented clients pass through
        with self._lock:
            self._marks[run_id] = mark

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any) -> None:
        self.on_chat_model_start(serialized, [[p] for p in prompts], run_id=run_id, **kwargs)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._take(run_id)
        if call is None:
            return
        usage, model = None, None
        for batch in response.generations or []:
            for gen in batch:
                msg = getattr(gen, "message", None)
                u = usage_of(msg)
                if u is not None:
                    usage = u if usage is None else usage + u
                    model = (getattr(msg, "response_metadata", None) or {}).get("model_name") or model
        call.commit_sync(call.priced(usage, model))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._take(run_id)
        if call is not None:
            call.guard.release("llm_error")

    # ------------------------------------------------------------------ tools

    def on_tool_start(self, serialized: dict[str, Any], input_str: str, *, run_id: UUID,
                      metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        name = (serialized or {}).get("name") or kwargs.get("name") or "tool"
        estimate = self.tool_estimates.get(name, self.default_tool_estimate)
        opts = self.opts
        cl = opts.client(False)
        info = {"tool": name, "input": input_str, "metadata": metadata or {}}
        spec = build_spec(opts.with_(action_name=None), cl, info, estimate=estimate, action_kind="tool.call",
                          action_name=name, subject_overrides=self._scope_from(metadata))
        self._start(run_id, Call(opts, None, SyncGuard(cl, spec, shadow=opts.is_shadow), spec, None))

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._take(run_id)
        if call is not None:
            call.guard.commit(call.spec.estimate, None)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._take(run_id)
        if call is not None:
            call.guard.release("tool_error")


__all__ = ["CyclesCallbackHandler", "usage_of"]
