"""CyclesRunHooks with the Agents SDK's own ScriptedModel, a real function tool and a real Cycles server."""

from __future__ import annotations

import asyncio

import pytest
from agents import Agent, ModelSettings, Runner, function_tool
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from integ_helpers import ONE_STORE, make_async_client, price_of, reservations

from cycles.client import BudgetExceededError
from cycles.integrations.openai_agents import CyclesRunHooks

pytestmark = ONE_STORE


def usage(inp: int, out: int, cached: int = 0) -> Usage:
    return Usage(requests=1, input_tokens=inp, output_tokens=out, total_tokens=inp + out,
                 input_tokens_details=InputTokensDetails(cached_tokens=cached, cache_write_tokens=0),
                 output_tokens_details=OutputTokensDetails(reasoning_tokens=0))


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}"


def weather_agent(model: ScriptedModel) -> Agent:
    return Agent(name="forecaster", instructions="Answer with the weather.", model=model, tools=[get_weather],
                 model_settings=ModelSettings(max_tokens=400))


def test_llm_calls_priced_and_tool_reserved(funded, config):
    model = ScriptedModel([
        ModelStep(output=[function_call("get_weather", {"city": "Paris"}, call_id="call-1")],
                  usage=usage(900, 40, cached=300)),
        ModelStep(output=[assistant_message("Sunny in Paris.")], usage=usage(1000, 12)),
    ])

    async def main():
        cl = make_async_client(config)
        hooks = CyclesRunHooks(cycles_client=cl, model="gpt-4.1-mini", tool_estimates={"get_weather": 20_000})
        result = await Runner.run(weather_agent(model), "Weather in Paris?", hooks=hooks)
        await cl.aclose()
        return result

    assert asyncio.run(main()).final_output == "Sunny in Paris."
    found = reservations(funded)
    llm = sorted(r["committed"]["amount"] for r in found if r["action"]["kind"] == "llm.completion")
    assert llm == sorted([price_of({"input_tokens": 900, "cache_read_tokens": 300, "output_tokens": 40},
                                   "gpt-4.1-mini", "openai"),
                          price_of({"input_tokens": 1000, "output_tokens": 12}, "gpt-4.1-mini", "openai")])
    tool = [r for r in found if r["action"]["kind"] == "tool.call"]
    assert [(t["action"]["name"], t["committed"]["amount"]) for t in tool] == [("get_weather", 20_000)]
    assert {r["subject"]["agent"] for r in found} == {"forecaster"}


def test_denied_run_keeps_the_cycles_error_and_never_calls_the_model(tenant, config):
    tenant.budget(amount=10)
    model = ScriptedModel([ModelStep(output=[assistant_message("never")], usage=usage(10, 1))])

    async def main():
        cl = make_async_client(config)
        try:
            await Runner.run(weather_agent(model), "Weather?", hooks=CyclesRunHooks(cycles_client=cl,
                                                                                    model="gpt-4.1-mini"))
        finally:
            await cl.aclose()

    with pytest.raises(BudgetExceededError) as err:
        asyncio.run(main())
    assert err.value.error_code == "BUDGET_EXCEEDED" or err.value.reason_code == "BUDGET_EXCEEDED"
    assert model.calls == () and model.remaining_steps == 1


def test_failed_model_call_is_released(funded, config):
    model = ScriptedModel([ModelStep.raise_error(RuntimeError("provider down"))])

    async def main():
        cl = make_async_client(config)
        hooks = CyclesRunHooks(cycles_client=cl, model="gpt-4.1-mini")
        try:
            await Runner.run(weather_agent(model), "Weather?", hooks=hooks)
        except RuntimeError:
            await hooks.release_open()
        finally:
            await cl.aclose()

    asyncio.run(main())
    assert [r["status"] for r in reservations(funded)] == ["RELEASED"]
