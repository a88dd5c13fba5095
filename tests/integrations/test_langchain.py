"""CyclesCallbackHandler with LangChain's own fake chat model, a real tool, a LangGraph graph and a real server."""

from __future__ import annotations

import asyncio
from typing import Any, TypedDict

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool

from integ_helpers import ONE_STORE, only_reservation, price_of, reservations

from cycles.client import BudgetExceededError
from cycles.integrations.langchain import CyclesCallbackHandler

pytestmark = ONE_STORE

USAGE = {"input_tokens": 1200, "output_tokens": 300, "total_tokens": 1500,
         "input_token_details": {"cache_read": 200}}


class ScriptedChatModel(GenericFakeChatModel):
    """LangChain's fake chat model, reporting the LangSmith params a ChatOpenAI would."""

    calls: int = 0

    def _get_ls_params(self, stop: Any = None, **kwargs: Any) -> dict[str, Any]:
        return {"ls_provider": "openai", "ls_model_name": "gpt-4o-mini", "ls_model_type": "chat",
                "ls_max_tokens": 500}

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super()._generate(*args, **kwargs)


def scripted(n: int = 1) -> ScriptedChatModel:
    return ScriptedChatModel(messages=iter([
        AIMessage(content="ok", usage_metadata=USAGE, response_metadata={"model_name": "gpt-4o-mini-2024-07-18"})
        for _ in range(n)]))


EXPECTED = price_of({"input_tokens": 1200, "cache_read_tokens": 200, "output_tokens": 300},
                    "gpt-4o-mini-2024-07-18", "openai")


def test_chat_model_priced_from_usage_metadata(funded, cycles_client):
    handler = CyclesCallbackHandler(cycles_client=cycles_client)
    model = scripted()
    assert model.invoke([HumanMessage("hello")], config={"callbacks": [handler]}).content == "ok"
    res = only_reservation(funded)
    assert res["committed"]["amount"] == EXPECTED
    assert res["action"] == {"kind": "llm.completion", "name": "openai:gpt-4o-mini"}


def test_async_invoke(funded, cycles_client):
    handler = CyclesCallbackHandler(cycles_client=cycles_client)
    asyncio.run(scripted().ainvoke([HumanMessage("hello")], config={"callbacks": [handler]}))
    assert only_reservation(funded)["committed"]["amount"] == EXPECTED


def test_denied_model_is_not_called(tenant, cycles_client):
    tenant.budget(amount=10)
    handler = CyclesCallbackHandler(cycles_client=cycles_client)
    model = scripted()
    with pytest.raises(BudgetExceededError):
        model.invoke([HumanMessage("hello")], config={"callbacks": [handler]})
    assert model.calls == 0


def test_tool_reserved_by_its_estimate(funded, cycles_client):
    @tool
    def search(query: str) -> str:
        """Search the docs."""
        return f"results for {query}"

    handler = CyclesCallbackHandler(cycles_client=cycles_client, tool_estimates={"search": 50_000})
    assert search.invoke({"query": "budgets"}, config={"callbacks": [handler]}) == "results for budgets"
    res = only_reservation(funded)
    assert res["action"] == {"kind": "tool.call", "name": "search"}
    assert res["committed"]["amount"] == 50_000


def test_tool_error_releases(funded, cycles_client):
    @tool
    def broken(query: str) -> str:
        """Always fails."""
        raise RuntimeError("down")

    handler = CyclesCallbackHandler(cycles_client=cycles_client, default_tool_estimate=1_000)
    with pytest.raises(RuntimeError):
        broken.invoke({"query": "x"}, config={"callbacks": [handler]})
    assert only_reservation(funded)["status"] == "RELEASED"


def test_langgraph_node_becomes_the_agent_scope(funded, cycles_client):
    from langgraph.graph import END, START, StateGraph

    class State(TypedDict):
        messages: list

    model = scripted(2)

    def researcher(state: State) -> State:
        return {"messages": state["messages"] + [model.invoke(state["messages"])]}

    def writer(state: State) -> State:
        return {"messages": state["messages"] + [model.invoke(state["messages"])]}

    g = StateGraph(State)
    g.add_node("researcher", researcher)
    g.add_node("writer", writer)
    g.add_edge(START, "researcher")
    g.add_edge("researcher", "writer")
    g.add_edge("writer", END)
    handler = CyclesCallbackHandler(cycles_client=cycles_client, workflow="report")
    g.compile().invoke({"messages": [HumanMessage("write a report")]}, config={"callbacks": [handler]})
    subjects = sorted((r["subject"]["agent"], r["committed"]["amount"]) for r in reservations(funded))
    assert subjects == [("researcher", EXPECTED), ("writer", EXPECTED)]
    assert all(r["subject"]["workflow"] == "report" for r in reservations(funded))


# ---------------------------------------------------------------- an instrumented client inside a handled model


def _chat_openai(fake, sync_cycles=None, async_cycles=None):
    from langchain_openai import ChatOpenAI
    from openai import AsyncOpenAI, OpenAI

    from cycles.integrations.openai import instrument

    kw = {"base_url": fake.base_url + "/v1", "api_key": "sk-test", "max_retries": 0}
    sync = instrument(OpenAI(**kw), cycles_client=sync_cycles) if sync_cycles else OpenAI(**kw)
    aio = instrument(AsyncOpenAI(**kw), cycles_client=async_cycles) if async_cycles else AsyncOpenAI(**kw)
    model = ChatOpenAI(model="gpt-4o-mini", max_tokens=50, api_key="sk-test", base_url=fake.base_url + "/v1",
                       client=sync.chat.completions, root_client=sync, async_client=aio.chat.completions,
                       root_async_client=aio)
    return model, sync


def _fake_price(body: dict) -> int:
    from fake_providers import usage_for

    u = usage_for(body)
    return price_of({"input_tokens": u["prompt"], "cache_read_tokens": u["cached"], "output_tokens": u["output"]},
                    "gpt-4o-mini-2024-07-18", "openai")


def test_instrumented_client_inside_a_handled_model_is_counted_once(funded, cycles_client, fake):
    model, client = _chat_openai(fake, sync_cycles=cycles_client)
    model.invoke("alone")  # no handler: the instrumented client guards the call itself (priced from usage)
    handler = CyclesCallbackHandler(cycles_client=cycles_client, workflow="handled")
    model.invoke("with the handler", config={"callbacks": [handler]})
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=20,  # after the run: guarded again
                                   messages=[{"role": "user", "content": "direct"}])
    assert fake.count() == 3
    res = sorted(reservations(funded), key=lambda r: r["subject"].get("workflow") or "")
    assert len(res) == 3, res  # one per provider call: the handled one was not reserved twice
    assert [r["subject"].get("workflow") for r in res] == [None, None, "handled"]
    assert sorted(r["committed"]["amount"] for r in res) == sorted(_fake_price(r.body) for r in fake.requests)


def test_instrumented_async_client_inside_a_handled_model_is_counted_once(funded, config, cycles_client, fake):
    from integ_helpers import make_async_client

    async def main():
        cl = make_async_client(config)
        model, _ = _chat_openai(fake, async_cycles=cl)
        handler = CyclesCallbackHandler(cycles_client=cycles_client, workflow="handled")
        await model.ainvoke("with the handler", config={"callbacks": [handler]})
        await model.ainvoke("alone")
        await cl.aclose()

    asyncio.run(main())
    assert fake.count() == 2
    res = reservations(funded)
    assert len(res) == 2, res
    assert sorted(r["subject"].get("workflow") or "-" for r in res) == ["-", "handled"]
    assert sorted(r["committed"]["amount"] for r in res) == sorted(_fake_price(r.body) for r in fake.requests)
