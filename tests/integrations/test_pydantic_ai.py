"""CyclesModel with Pydantic AI's own FunctionModel / TestModel and a real Cycles server."""

from __future__ import annotations

import asyncio

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import RequestUsage

from integ_helpers import ONE_STORE, make_async_client, price_of, reservations

from cycles.client import BudgetExceededError
from cycles.integrations.pydantic_ai import CyclesModel

pytestmark = ONE_STORE

USAGES = [RequestUsage(input_tokens=800, output_tokens=30, cache_read_tokens=100),
          RequestUsage(input_tokens=900, output_tokens=15)]


def scripted_model() -> FunctionModel:
    def respond(messages: list, info: AgentInfo) -> ModelResponse:
        turn = sum(1 for m in messages if isinstance(m, ModelResponse))
        if turn == 0:
            return ModelResponse(parts=[ToolCallPart("lookup", {"key": "plan"})], usage=USAGES[0])
        return ModelResponse(parts=[TextPart("The plan is pro.")], usage=USAGES[1])

    async def stream(messages: list, info: AgentInfo):
        for word in ["The ", "plan ", "is ", "pro."]:
            yield word

    return FunctionModel(respond, stream_function=stream, model_name="gpt-4o-mini")


def agent_for(model) -> Agent:
    agent = Agent(model, instructions="Answer from the lookup tool.")

    @agent.tool_plain
    def lookup(key: str) -> str:
        return "pro"

    return agent


def test_each_model_request_priced(funded, config):
    async def main():
        cl = make_async_client(config)
        result = await agent_for(CyclesModel(scripted_model(), provider="openai", cycles_client=cl)).run("plan?")
        await cl.aclose()
        return result

    assert asyncio.run(main()).output == "The plan is pro."
    committed = sorted(r["committed"]["amount"] for r in reservations(funded))
    assert committed == sorted([
        price_of({"input_tokens": 800, "cache_read_tokens": 100, "output_tokens": 30}, "gpt-4o-mini", "openai"),
        price_of({"input_tokens": 900, "output_tokens": 15}, "gpt-4o-mini", "openai")])


def test_stream_priced_from_the_streamed_usage(funded, config):
    async def main():
        cl = make_async_client(config)
        agent = Agent(CyclesModel(scripted_model(), provider="openai", cycles_client=cl))
        async with agent.run_stream("plan?") as run:
            text = await run.get_output()
            usage = run.usage
        await cl.aclose()
        return text, usage

    text, usage = asyncio.run(main())
    assert text == "The plan is pro."
    [res] = reservations(funded)
    assert res["committed"]["amount"] == price_of({"input_tokens": usage.input_tokens,
                                                   "output_tokens": usage.output_tokens}, "gpt-4o-mini", "openai")


def test_test_model_priced_as_a_named_model(funded, config):
    async def main():
        cl = make_async_client(config)
        model = CyclesModel(TestModel(custom_output_text="done"), provider="anthropic", model="claude-haiku-4-5",
                            cycles_client=cl)
        result = await Agent(model).run("hi")
        await cl.aclose()
        return result

    result = asyncio.run(main())
    u = result.usage
    [res] = reservations(funded)
    assert res["committed"]["amount"] == price_of({"input_tokens": u.input_tokens, "output_tokens": u.output_tokens},
                                                  "claude-haiku-4-5", "anthropic") > 0


def test_denied_request_never_reaches_the_model(tenant, config):
    tenant.budget(amount=10)
    calls = []

    def respond(messages: list, info: AgentInfo) -> ModelResponse:
        calls.append(1)
        return ModelResponse(parts=[TextPart("no")])

    async def main():
        cl = make_async_client(config)
        try:
            await Agent(CyclesModel(FunctionModel(respond, model_name="gpt-4o"), provider="openai",
                                    cycles_client=cl)).run("hi")
        finally:
            await cl.aclose()

    with pytest.raises(BudgetExceededError):
        asyncio.run(main())
    assert calls == []




def test_instrumented_client_under_cycles_model_is_counted_once(funded, config, fake):
    from openai import AsyncOpenAI
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    from fake_providers import usage_for
    from cycles.integrations.openai import instrument

    async def main():
        cl = make_async_client(config)
        client = instrument(AsyncOpenAI(base_url=fake.base_url + "/v1", api_key="sk-test", max_retries=0),
                            cycles_client=cl)
        model = OpenAIChatModel("gpt-4o-mini", provider=OpenAIProvider(openai_client=client))
        await Agent(CyclesModel(model, cycles_client=cl, workflow="wrapped")).run("hi")
        await Agent(model).run("alone")  # the instrumented client on its own still guards its call
        await cl.aclose()

    asyncio.run(main())
    assert fake.count() == 2
    res = reservations(funded)
    assert sorted(r["subject"].get("workflow") or "-" for r in res) == ["-", "wrapped"]
    u = [usage_for(r.body) for r in fake.requests]
    assert sorted(r["committed"]["amount"] for r in res) == sorted(
        price_of({"input_tokens": x["prompt"], "cache_read_tokens": x["cached"], "output_tokens": x["output"]},
                 "gpt-4o-mini-2024-07-18", "openai") for x in u)
