"""CyclesChatCompletionClient around AutoGen's own OpenAIChatCompletionClient (on the fake provider) and
ReplayChatCompletionClient, with AgentChat's AssistantAgent and a real Cycles server."""

from __future__ import annotations

import asyncio

import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_core.models import CreateResult, RequestUsage, UserMessage
from autogen_ext.models.openai import OpenAIChatCompletionClient
from autogen_ext.models.replay import ReplayChatCompletionClient

from fake_providers import usage_for
from integ_helpers import ONE_STORE, make_async_client, price_of, reservations

from cycles.client import BudgetExceededError
from cycles.integrations.autogen import CyclesChatCompletionClient

pytestmark = ONE_STORE


def test_assistant_agent_priced_from_the_provider_usage(funded, config, fake):
    async def main():
        cl = make_async_client(config)
        inner = OpenAIChatCompletionClient(model="gpt-4o-mini", base_url=fake.base_url + "/v1", api_key="sk-test")
        agent = AssistantAgent("writer", model_client=CyclesChatCompletionClient(inner, cycles_client=cl,
                                                                                  agent="writer"))
        result = await agent.run(task="Write a haiku about budgets.")
        await cl.aclose()
        return result

    result = asyncio.run(main())
    assert result.messages[-1].content.startswith("Budgets")
    u = usage_for(fake.last().body)
    [res] = reservations(funded)
    # AutoGen reports prompt/completion tokens only (no cache split): all input at the input price
    assert res["committed"]["amount"] == price_of({"input_tokens": u["prompt"], "output_tokens": u["output"]},
                                                  "gpt-4o-mini", "openai")
    assert res["subject"]["agent"] == "writer"


def test_stream_and_denial(tenant, config):
    tenant.budget(amount=10_000_000)
    final = CreateResult(finish_reason="stop", content="hello there", cached=False,
                         usage=RequestUsage(prompt_tokens=1_000, completion_tokens=100))
    inner = ReplayChatCompletionClient([final, final])

    async def main():
        cl = make_async_client(config)
        model = CyclesChatCompletionClient(inner, model="gpt-4o", cycles_client=cl)
        items = [x async for x in model.create_stream([UserMessage(content="hi", source="user")])]
        with pytest.raises(BudgetExceededError):  # the bound of 100k output tokens does not fit what is left
            await model.create([UserMessage(content="hi", source="user")],
                               extra_create_args={"max_tokens": 100_000})
        await cl.aclose()
        return items

    items = asyncio.run(main())
    assert isinstance(items[-1], CreateResult)
    [res] = reservations(tenant)
    assert res["committed"]["amount"] == price_of({"input_tokens": 1_000, "output_tokens": 100}, "gpt-4o", "openai")
