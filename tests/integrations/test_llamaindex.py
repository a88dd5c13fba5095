"""CyclesLLM around LlamaIndex's own OpenAI LLM (llama-index-llms-openai) on the fake provider, driven directly
(chat, complete, stream, async) and by LlamaIndex's FunctionAgent, with a real Cycles server.

llama-index-llms-openai declares `openai<3` while this project's OpenAI integration is tested on openai 3:
.ci/run installs it without its dependencies (its code runs on openai 3, as these tests show), so a plain
`pip install -e '.[test]'` skips this module. llama-index-core itself is in the `[llamaindex]` extra."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

if importlib.util.find_spec("llama_index.llms.openai") is None:
    pytest.skip("llama-index-llms-openai: installed by .ci/run (--no-deps)", allow_module_level=True)

# LlamaIndex is imported by the tests themselves, not at collection: it takes seconds, in every xdist worker

from fake_providers import usage_for  # noqa: E402
from integ_helpers import ONE_STORE, make_async_client, price_of, reservations  # noqa: E402

from cycles.client import BudgetExceededError  # noqa: E402

pytestmark = ONE_STORE


def openai_llm(fake):
    from llama_index.llms.openai import OpenAI

    # stream_options: LlamaIndex's documented way to have streams report usage (dropped when not streaming)
    return OpenAI(model="gpt-4o-mini", api_base=fake.base_url + "/v1", api_key="sk-test", max_tokens=100,
                  max_retries=0, additional_kwargs={"stream_options": {"include_usage": True}})


def expected(body: dict) -> int:
    u = usage_for(body)
    return price_of({"input_tokens": u["prompt"], "cache_read_tokens": u["cached"], "output_tokens": u["output"]},
                    "gpt-4o-mini-2024-07-18", "openai")


def committed(tenant) -> list[int]:
    return [r["committed"]["amount"] for r in reservations(tenant) if r["status"] == "COMMITTED"]


def test_chat_complete_and_stream_priced_from_usage(funded, cycles_client, fake):
    from llama_index.core.llms import ChatMessage

    from cycles.integrations.llamaindex import CyclesLLM

    llm = CyclesLLM(openai_llm(fake), cycles_client=cycles_client, workflow="rag")
    assert llm.chat([ChatMessage(role="user", content="What is a reservation?")]).message.content.startswith("Budgets")
    assert llm.complete("Define a budget.").text.startswith("Budgets")
    text = "".join(r.delta or "" for r in llm.stream_chat([ChatMessage(role="user", content="Stream it.")]))
    assert text == "Budgets are enforced before the call."
    bodies = [r.body for r in fake.requests]
    assert len(bodies) == 3 and bodies[-1]["stream"] is True
    assert sorted(committed(funded)) == sorted(expected(b) for b in bodies)
    res = reservations(funded)
    assert {r["action"]["name"] for r in res} == {"openai:gpt-4o-mini"}
    assert all(r["subject"]["workflow"] == "rag" for r in res)


def test_function_agent_priced(funded, config, fake):
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    from cycles.integrations.llamaindex import CyclesLLM

    def weather(city: str) -> str:
        """The weather in a city."""
        return f"Sunny in {city}"

    async def main():
        cl = make_async_client(config)
        agent = FunctionAgent(tools=[FunctionTool.from_defaults(weather)],
                              llm=CyclesLLM(openai_llm(fake), cycles_client=cl, agent="concierge"))
        out = await agent.run("Weather in Paris?")
        await cl.aclose()
        return out

    out = asyncio.run(main())
    assert "Budgets" in str(out)
    [body] = [r.body for r in fake.requests]
    assert body["stream"] is True and body["tools"][0]["function"]["name"] == "weather"  # the agent's streamed turn
    assert committed(funded) == [expected(body)]
    assert reservations(funded)[0]["subject"]["agent"] == "concierge"


def test_denied_llm_is_not_called(tenant, cycles_client, fake):
    from llama_index.core.llms import ChatMessage

    from cycles.integrations.llamaindex import CyclesLLM

    tenant.budget(amount=10)
    llm = CyclesLLM(openai_llm(fake), cycles_client=cycles_client)
    with pytest.raises(BudgetExceededError):
        llm.chat([ChatMessage(role="user", content="hi")])
    assert fake.count() == 0


def test_error_releases(funded, config, fake):
    from llama_index.core.llms import ChatMessage

    from cycles.integrations.llamaindex import CyclesLLM

    async def main():
        cl = make_async_client(config)
        llm = CyclesLLM(openai_llm(fake), cycles_client=cl)
        with pytest.raises(Exception, match="asked to fail"):
            await llm.achat([ChatMessage(role="user", content="PLEASE FAIL")])
        await cl.aclose()

    asyncio.run(main())
    [res] = reservations(funded)
    assert res["status"] == "RELEASED" and fake.count() == 1
