"""CyclesLLM around CrewAI's own LLM (its native OpenAI provider) on the fake provider, driven directly and by
a Crew of one agent, with a real Cycles server.

CrewAI pins `mcp<2`, `openai<3` and `pydantic<2.13`, which this project's core (mcp>=2.3) and other
integrations cannot meet, and its full install is ~1 GB: .ci/run installs it without its dependencies,
plus the few modules `import crewai` needs (tests/integrations/requirements-nodeps.txt). A plain
`pip install -e '.[test]'` skips this module."""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest

for _k, _v in {"CREWAI_DISABLE_TELEMETRY": "true", "OTEL_SDK_DISABLED": "true", "CREWAI_TRACING_ENABLED": "false",
               "CREWAI_DISABLE_TRACKING": "true"}.items():
    os.environ.setdefault(_k, _v)  # no telemetry export attempts (there is no network)

if importlib.util.find_spec("crewai") is None:
    pytest.skip("crewai: installed by .ci/run (--no-deps)", allow_module_level=True)

# crewai is imported by the tests themselves, not at collection: it takes seconds, in every xdist worker

from fake_providers import usage_for  # noqa: E402
from integ_helpers import ONE_STORE, make_async_client, price_of, reservations  # noqa: E402

from cycles.client import BudgetExceededError  # noqa: E402

pytestmark = ONE_STORE


def crew_llm(fake):
    from crewai import LLM

    return LLM(model="gpt-4o-mini", base_url=fake.base_url + "/v1", api_key="sk-test", max_tokens=100, max_retries=0)


def expected(body: dict) -> int:
    u = usage_for(body)
    return price_of({"input_tokens": u["prompt"], "cache_read_tokens": u["cached"], "output_tokens": u["output"]},
                    "gpt-4o-mini", "openai")


def committed(tenant) -> list[int]:
    return sorted(r["committed"]["amount"] for r in reservations(tenant) if r["status"] == "COMMITTED")


def test_crew_and_direct_calls_priced_from_usage(funded, cycles_client, config, fake):
    from crewai import Agent, Crew, Task

    from cycles.integrations.crewai import CyclesLLM

    llm = CyclesLLM(crew_llm(fake), cycles_client=cycles_client, workflow="crew")
    writer = Agent(role="writer", goal="Write short answers", backstory="A terse writer.", llm=llm)
    task = Task(description="Write a haiku about budgets.", expected_output="a haiku", agent=writer)
    out = Crew(agents=[writer], tasks=[task]).kickoff()
    assert out.raw.startswith("Budgets")
    assert llm.call("Define a budget.").startswith("Budgets")

    async def acall():
        cl = make_async_client(config)
        result = await CyclesLLM(crew_llm(fake), cycles_client=cl, workflow="crew").acall("Async, please.")
        await cl.aclose()
        return result

    assert asyncio.run(acall()).startswith("Budgets")
    bodies = [r.body for r in fake.requests]
    assert len(bodies) == 3
    assert committed(funded) == sorted(expected(b) for b in bodies)
    res = reservations(funded)
    assert {r["action"]["name"] for r in res} == {"openai:gpt-4o-mini"}
    assert {r["subject"]["workflow"] for r in res} == {"crew"}


def test_denied_llm_is_not_called(tenant, cycles_client, fake):
    from cycles.integrations.crewai import CyclesLLM

    tenant.budget(amount=10)
    with pytest.raises(BudgetExceededError):
        CyclesLLM(crew_llm(fake), cycles_client=cycles_client).call("hi")
    assert fake.count() == 0


def test_error_releases(funded, cycles_client, fake):
    from cycles.integrations.crewai import CyclesLLM

    with pytest.raises(Exception, match="asked to fail"):
        CyclesLLM(crew_llm(fake), cycles_client=cycles_client).call("PLEASE FAIL")
    assert fake.count() == 1
    assert [r["status"] for r in reservations(funded)] == ["RELEASED"]
