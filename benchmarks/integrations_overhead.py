#!/usr/bin/env python3
"""Overhead of each integration per guarded call: Cycles round trips and µs added beside the provider call.

One `cycles serve` (temporary SQLite store, free loopback port) and the tests' fake provider server
(tests/integrations/fake_providers.py, uvicorn on loopback in this process) serve every scenario. For each
integration the same call runs N times unguarded and N times guarded (after a warm-up of each); reported
per call: HTTP requests to the Cycles server (counted by an httpx event hook on the Cycles client), the
unguarded mean, the guarded mean, and the added mean and p50. The frameworks' own test models (LangChain's
fake chat model, Pydantic AI's FunctionModel, the Agents SDK's ScriptedModel, AutoGen's replay client) have
no provider call at all, so their added time is the whole integration. A last row times the pricing alone
(estimate + actual of one call, no I/O).

Usage:  .venv/bin/python benchmarks/integrations_overhead.py [--calls 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integrations"))
# The same private `cycles serve` as the SDK overhead benchmark (this directory is on sys.path when run).
from sdk_overhead import ADMIN_KEY, free_port, start_server  # noqa: E402
MESSAGES = [{"role": "user", "content": "Why reserve before calling the model? One line."}]


def provision(base: str) -> tuple[str, str]:
    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=base, headers={"X-Admin-API-Key": ADMIN_KEY}, timeout=30) as c:
        c.post("/v1/admin/tenants", json={"tenant_id": tenant, "name": tenant}).raise_for_status()
        r = c.post("/v1/admin/api-keys", json={"tenant_id": tenant, "name": "bench", "permissions": [
            "reservations:create", "reservations:commit", "reservations:release", "reservations:extend"]})
        r.raise_for_status()
        c.post("/v1/admin/budgets", json={"tenant_id": tenant, "scope": f"tenant:{tenant}", "unit": "USD_MICROCENTS",
                                          "allocated": {"unit": "USD_MICROCENTS", "amount": 10**15}}).raise_for_status()
    return tenant, r.json()["key_secret"]


class Counter:
    n = 0

    def sync(self, request: httpx.Request) -> None:
        self.n += 1

    async def aio(self, request: httpx.Request) -> None:
        self.n += 1


def scenarios(fake_url: str, sync_cl: Any, async_cl: Any, loop: asyncio.AbstractEventLoop
              ) -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    import anthropic
    import openai

    from cycles.integrations.anthropic import instrument as instrument_anthropic
    from cycles.integrations.openai import instrument as instrument_openai

    from cycles.client import cycles

    def noop() -> int:
        return 1

    out: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        ("@cycles on a no-op (the SDK's guard, for scale)", noop,
         cycles(1000, actual=700, action_kind="bench", action_name="noop", client=sync_cl)(noop))]
    oa_plain = openai.OpenAI(base_url=fake_url + "/v1", api_key="sk", max_retries=0)
    oa = instrument_openai(openai.OpenAI(base_url=fake_url + "/v1", api_key="sk", max_retries=0), cycles_client=sync_cl)
    out.append(("openai chat.completions.create",
                lambda: oa_plain.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50),
                lambda: oa.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)))
    out.append(("openai chat stream (usage chunk)",
                lambda: list(oa_plain.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                                              stream_options={"include_usage": True})),
                lambda: list(oa.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))))
    an_plain = anthropic.Anthropic(base_url=fake_url, api_key="sk", max_retries=0)
    an = instrument_anthropic(anthropic.Anthropic(base_url=fake_url, api_key="sk", max_retries=0),
                              cycles_client=sync_cl)
    out.append(("anthropic messages.create",
                lambda: an_plain.messages.create(model="claude-sonnet-4-5", max_tokens=50, messages=MESSAGES),
                lambda: an.messages.create(model="claude-sonnet-4-5", max_tokens=50, messages=MESSAGES)))

    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    from cycles.integrations.langchain import CyclesCallbackHandler

    usage = {"input_tokens": 100, "output_tokens": 20, "total_tokens": 120}

    class Model(GenericFakeChatModel):
        def _get_ls_params(self, stop: Any = None, **kw: Any) -> dict[str, Any]:
            return {"ls_provider": "openai", "ls_model_name": "gpt-4o-mini", "ls_max_tokens": 50}

    def lc_model() -> Any:
        return Model(messages=iter(AIMessage(content="ok", usage_metadata=usage) for _ in range(10**9)))

    lc_plain, lc = lc_model(), lc_model()
    handler = CyclesCallbackHandler(cycles_client=sync_cl)
    out.append(("langchain CyclesCallbackHandler", lambda: lc_plain.invoke("hi"),
                lambda: lc.invoke("hi", config={"callbacks": [handler]})))

    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelResponse, TextPart
    from pydantic_ai.models.function import FunctionModel
    from pydantic_ai.usage import RequestUsage

    from cycles.integrations.pydantic_ai import CyclesModel

    def respond(messages: list, info: Any) -> ModelResponse:
        return ModelResponse(parts=[TextPart("ok")], usage=RequestUsage(input_tokens=100, output_tokens=20))

    pa_plain = Agent(FunctionModel(respond, model_name="gpt-4o-mini"))
    pa = Agent(CyclesModel(FunctionModel(respond, model_name="gpt-4o-mini"), provider="openai", cycles_client=async_cl))
    out.append(("pydantic-ai CyclesModel", lambda: loop.run_until_complete(pa_plain.run("hi")),
                lambda: loop.run_until_complete(pa.run("hi"))))

    from agents import Agent as OAAgent
    from agents import Runner
    from agents.testing import ModelStep, ScriptedModel, assistant_message
    from agents.usage import Usage
    from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

    from cycles.integrations.openai_agents import CyclesRunHooks

    def agent() -> Any:
        u = Usage(requests=1, input_tokens=100, output_tokens=20, total_tokens=120,
                  input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
                  output_tokens_details=OutputTokensDetails(reasoning_tokens=0))
        return OAAgent(name="a", model=ScriptedModel([ModelStep(output=[assistant_message("ok")], usage=u)]))

    hooks = CyclesRunHooks(cycles_client=async_cl, model="gpt-4o-mini")
    out.append(("openai-agents CyclesRunHooks", lambda: loop.run_until_complete(Runner.run(agent(), "hi")),
                lambda: loop.run_until_complete(Runner.run(agent(), "hi", hooks=hooks))))

    from autogen_core.models import CreateResult, RequestUsage as AGUsage, UserMessage
    from autogen_ext.models.replay import ReplayChatCompletionClient

    from cycles.integrations.autogen import CyclesChatCompletionClient

    result = CreateResult(finish_reason="stop", content="ok", cached=False, usage=AGUsage(prompt_tokens=100,
                                                                                          completion_tokens=20))
    ag_plain = ReplayChatCompletionClient([result] * 10**5)
    ag = CyclesChatCompletionClient(ReplayChatCompletionClient([result] * 10**5), model="gpt-4o-mini",
                                    cycles_client=async_cl)
    msg = [UserMessage(content="hi", source="user")]
    out.append(("autogen CyclesChatCompletionClient", lambda: loop.run_until_complete(ag_plain.create(msg)),
                lambda: loop.run_until_complete(ag.create(msg))))

    import importlib.util

    # installed by .ci/run without their dependencies (tests/integrations/requirements-nodeps.txt)
    if importlib.util.find_spec("llama_index.llms.openai") is not None:
        from llama_index.core.llms import ChatMessage
        from llama_index.llms.openai import OpenAI as LIOpenAI

        from cycles.integrations.llamaindex import CyclesLLM

        def li_llm() -> Any:
            return LIOpenAI(model="gpt-4o-mini", api_base=fake_url + "/v1", api_key="sk", max_tokens=50, max_retries=0)

        li_plain, li = li_llm(), CyclesLLM(li_llm(), cycles_client=sync_cl)
        li_msgs = [ChatMessage(role="user", content=MESSAGES[0]["content"])]
        out.append(("llamaindex CyclesLLM (OpenAI LLM, chat)", lambda: li_plain.chat(li_msgs),
                    lambda: li.chat(li_msgs)))
    if importlib.util.find_spec("crewai") is not None:
        os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("OTEL_SDK_DISABLED", "true")
        from crewai import LLM

        from cycles.integrations.crewai import CyclesLLM as CrewCyclesLLM

        def crew_llm() -> Any:
            return LLM(model="gpt-4o-mini", base_url=fake_url + "/v1", api_key="sk", max_tokens=50, max_retries=0)

        cr_plain, cr = crew_llm(), CrewCyclesLLM(crew_llm(), cycles_client=sync_cl)
        out.append(("crewai CyclesLLM (CrewAI LLM, call)", lambda: cr_plain.call(MESSAGES[0]["content"]),
                    lambda: cr.call(MESSAGES[0]["content"])))
    return out


CPU: dict[str, float] = {"us": 0.0}


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    """Wall µs of each call; CPU["us"] = this process's CPU µs per call (the Cycles server is another process,
    so this is the client side: provider client, integration, SDK; robust to a loaded machine)."""
    out = []
    c0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    CPU["us"] = (time.process_time() - c0) * 1e6 / n
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def pricing_row(n: int) -> dict[str, Any]:
    from genai_prices import Usage

    from cycles.pricing import Pricer, prompt_token_bound

    pricer = Pricer()
    u = Usage(input_tokens=1200, output_tokens=300, cache_read_tokens=200)
    t = timed(lambda: (pricer.estimate("gpt-4o-mini", "openai", input_tokens=prompt_token_bound(MESSAGES),
                                       output_tokens=50), pricer.actual(u, "gpt-4o-mini-2024-07-18", "openai")), n)
    return {"integration": "pricing alone (bound + estimate + actual)", "round_trips": 0.0, "plain_mean_us": 0.0,
            "guarded_mean_us": statistics.fmean(t), "added_mean_us": statistics.fmean(t), "added_p50_us": pct(t, .5),
            "added_cpu_us": CPU["us"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--only", help="run only the integrations whose name contains this text")
    args = ap.parse_args()
    os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")
    from fake_providers import FakeProviderServer

    from cycles.client import AsyncCyclesClient, CyclesClient, CyclesConfig

    with tempfile.TemporaryDirectory(prefix="cycles-integrations-bench-") as d:
        tmp = Path(d)
        proc, base = start_server(tmp)
        fake = FakeProviderServer(free_port()).start()
        loop = asyncio.new_event_loop()
        try:
            tenant, key = provision(base)
            cfg = CyclesConfig(base_url=base, api_key=key, tenant=tenant, journal_dir=str(tmp / "journal"),
                               journal_replay=False)
            counter = Counter()
            sync_cl = CyclesClient(cfg, http_client=httpx.Client(event_hooks={"request": [counter.sync]}))
            async_cl = AsyncCyclesClient(cfg, http_client=httpx.AsyncClient(event_hooks={"request": [counter.aio]}))
            results = []
            for name, plain, guarded in scenarios(fake.state.base_url, sync_cl, async_cl, loop):
                if args.only and args.only not in name and not name.startswith("@cycles"):
                    continue
                timed(plain, args.warmup)
                timed(guarded, args.warmup)
                p = timed(plain, args.calls)
                plain_cpu = CPU["us"]
                counter.n = 0
                g = timed(guarded, args.calls)
                trips = counter.n / args.calls
                fake.state.requests.clear()
                results.append({"integration": name, "round_trips": trips, "plain_mean_us": statistics.fmean(p),
                                "guarded_mean_us": statistics.fmean(g),
                                "added_mean_us": statistics.fmean(g) - statistics.fmean(p),
                                "added_p50_us": pct(g, .5) - pct(p, .5), "added_cpu_us": CPU["us"] - plain_cpu})
                print(f"{name}: done", file=sys.stderr)
            results.append(pricing_row(args.calls * 5))
            sync_cl.close()
            loop.run_until_complete(async_cl.aclose())
        finally:
            loop.close()
            fake.stop()
            proc.terminate()
            proc.wait(10)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("| integration | Cycles round trips / call | unguarded mean | guarded mean | added mean | added p50 "
          "| added client CPU / call |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['integration']} | {r['round_trips']:.2f} | {r['plain_mean_us'] / 1000:.2f} ms | "
              f"{r['guarded_mean_us'] / 1000:.2f} ms | {r['added_mean_us'] / 1000:.2f} ms | "
              f"{r['added_p50_us'] / 1000:.2f} ms | {r['added_cpu_us']:.0f} µs |")


if __name__ == "__main__":
    main()
