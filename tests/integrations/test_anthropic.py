"""cycles.integrations.anthropic against the real anthropic client, a local fake provider and a real Cycles server."""

from __future__ import annotations

import asyncio

import anthropic
import pytest

from fake_providers import TEXT, usage_for
from integ_helpers import ONE_STORE, make_async_client, only_reservation, price_of, reservations

from cycles.client import BudgetExceededError
from cycles.integrations.anthropic import instrument

pytestmark = ONE_STORE

MODEL = "claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "What does a reservation hold, and for how long? One sentence."}]
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def anthropic_client(fake, cl, *, is_async: bool = False, **options):
    cls = anthropic.AsyncAnthropic if is_async else anthropic.Anthropic
    return instrument(cls(base_url=fake.base_url, api_key="sk-ant-test", max_retries=0), cycles_client=cl,
                      **options)


def message_price(body: dict) -> int:
    u = usage_for(body)
    # genai-prices' input_tokens is every input token: uncached + cache reads + cache writes
    return price_of({"input_tokens": u["prompt"], "cache_read_tokens": u["cached"],
                     "cache_write_tokens": u["cache_write"], "output_tokens": u["output"]}, MODEL, "anthropic")


def test_messages_create_commits_the_price_of_the_usage(funded, cycles_client, fake):
    client = anthropic_client(fake, cycles_client)
    msg = client.messages.create(model=MODEL, max_tokens=300, system="Be brief.", messages=MESSAGES)
    assert msg.content[0].text == "".join(TEXT)
    res = only_reservation(funded)
    assert res["committed"]["amount"] == message_price(fake.last().body) > 0
    assert res["reserved"]["amount"] >= res["committed"]["amount"]
    assert res["action"] == {"kind": "llm.completion", "name": f"anthropic:{MODEL}"}


def test_tool_use_loop_is_one_reservation_per_call(funded, cycles_client, fake):
    client = anthropic_client(fake, cycles_client)
    messages = list(MESSAGES)
    prices = []
    while True:
        msg = client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=messages)
        prices.append(message_price(fake.last().body))
        if msg.stop_reason != "tool_use":
            break
        call = next(b for b in msg.content if b.type == "tool_use")
        messages += [{"role": "assistant", "content": msg.content},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C"}]}]
    assert len(prices) == 2
    assert sorted(r["committed"]["amount"] for r in reservations(funded)) == sorted(prices)


def test_create_stream_true(funded, cycles_client, fake):
    client = anthropic_client(fake, cycles_client)
    events = list(client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES, stream=True))
    assert events[-1].type == "message_stop"
    assert only_reservation(funded)["committed"]["amount"] == message_price(fake.last().body)


def test_messages_stream_helper(funded, cycles_client, fake):
    client = anthropic_client(fake, cycles_client)
    with client.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
    assert text == "".join(TEXT)
    assert only_reservation(funded)["committed"]["amount"] == message_price(fake.last().body)


def test_async_create_and_stream(funded, config, fake):
    async def main():
        cl = make_async_client(config)
        client = anthropic_client(fake, cl, is_async=True)
        await client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
        first = fake.last().body
        async with client.messages.stream(model=MODEL, max_tokens=64, system="x", messages=MESSAGES) as stream:
            final = await stream.get_final_message()
        await cl.aclose()
        return first, final

    first, final = asyncio.run(main())
    assert final.usage.output_tokens == usage_for(fake.last().body)["output"]
    assert sorted(r["committed"]["amount"] for r in reservations(funded)) == sorted(
        [message_price(first), message_price(fake.last().body)])


def test_denied_sends_nothing(tenant, cycles_client, fake):
    tenant.budget(amount=100)
    client = anthropic_client(fake, cycles_client)
    with pytest.raises(BudgetExceededError):
        client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    with pytest.raises(BudgetExceededError):
        with client.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES):
            pass
    assert fake.count() == 0 and reservations(tenant) == []


def test_denied_async_sends_nothing(tenant, config, fake):
    tenant.budget(amount=100)

    async def main():
        cl = make_async_client(config)
        client = anthropic_client(fake, cl, is_async=True)
        try:
            with pytest.raises(BudgetExceededError):
                async with client.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES):
                    pass
        finally:
            await cl.aclose()

    asyncio.run(main())
    assert fake.count() == 0


def test_provider_error_releases(funded, cycles_client, fake):
    client = anthropic_client(fake, cycles_client)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "PLEASE FAIL"}])
    with pytest.raises(anthropic.BadRequestError):
        with client.messages.stream(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "PLEASE FAIL"}]):
            pass
    assert [r["status"] for r in reservations(funded)] == ["RELEASED", "RELEASED"]
    assert funded.balance()["spent"]["amount"] == 0
