"""cycles.integrations.openai against the real openai client, a local fake provider and a real Cycles server."""

from __future__ import annotations

import asyncio

import openai
import pytest

from integ_helpers import ONE_STORE, make_async_client, only_reservation, price_of, reservations
from fake_providers import TEXT, usage_for

from cycles.client import BudgetExceededError
from cycles.integrations.openai import instrument
from cycles.pricing import UnknownModelError

pytestmark = ONE_STORE

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Why reserve before calling the model? Answer in one line please."}]


def openai_client(fake, cl, *, is_async: bool = False, **options):
    cls = openai.AsyncOpenAI if is_async else openai.OpenAI
    return instrument(cls(base_url=fake.base_url + "/v1", api_key="sk-test", max_retries=0), cycles_client=cl,
                      **options)


def chat_price(body: dict) -> int:
    u = usage_for(body)
    return price_of({"input_tokens": u["prompt"], "cache_read_tokens": u["cached"], "output_tokens": u["output"]},
                    "gpt-4o-mini-2024-07-18", "openai")


def test_chat_create_commits_the_price_of_the_usage(funded, cycles_client, fake):
    client = openai_client(fake, cycles_client)
    r = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=100)
    assert r.choices[0].message.content == "".join(TEXT)
    res = only_reservation(funded)
    assert res["status"] == "COMMITTED"
    assert res["committed"]["amount"] == chat_price(fake.last().body) > 0
    assert res["action"] == {"kind": "llm.completion", "name": "openai:gpt-4o-mini"}
    assert res["reserved"]["amount"] >= res["committed"]["amount"]  # the bound holds
    assert funded.balance()["spent"]["amount"] == res["committed"]["amount"]


def test_chat_stream_asks_for_usage_and_hides_that_chunk(funded, cycles_client, fake):
    client = openai_client(fake, cycles_client)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50, stream=True)
    chunks = list(stream)
    assert fake.last().body["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks)  # the usage-only chunk the caller did not ask for is not shown
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(TEXT)
    assert only_reservation(funded)["committed"]["amount"] == chat_price(fake.last().body)


def test_chat_stream_with_callers_usage_option_keeps_the_chunk(funded, cycles_client, fake):
    client = openai_client(fake, cycles_client)
    with client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                        stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert only_reservation(funded)["committed"]["amount"] == chat_price(fake.last().body)


def test_async_chat_create_and_stream(funded, config, fake):
    async def main():
        cl = make_async_client(config)
        client = openai_client(fake, cl, is_async=True)
        r = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=64)
        first = fake.last().body
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES[1:], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        await cl.aclose()
        return r, first, text

    r, first, text = asyncio.run(main())
    assert r.usage.prompt_tokens == usage_for(first)["prompt"] and text == "".join(TEXT)
    committed = sorted(x["committed"]["amount"] for x in reservations(funded))
    assert committed == sorted([chat_price(first), chat_price(fake.last().body)])


def responses_price(body: dict) -> int:
    u = usage_for(body)
    return price_of({"input_tokens": u["prompt"], "cache_read_tokens": u["cached"], "output_tokens": u["output"]},
                    "gpt-4o-2024-08-06", "openai")


def test_responses_create_and_stream(funded, cycles_client, fake):
    client = openai_client(fake, cycles_client)
    r = client.responses.create(model="gpt-4o", input="Summarise budgets.", instructions="Be brief.",
                                max_output_tokens=80)
    assert r.output_text == "".join(TEXT)
    first = fake.last().body
    events = list(client.responses.create(model="gpt-4o", input=MESSAGES, stream=True))
    assert events[-1].type == "response.completed"
    committed = sorted(x["committed"]["amount"] for x in reservations(funded))
    assert committed == sorted([responses_price(first), responses_price(fake.last().body)])


def test_async_responses_stream(funded, config, fake):
    async def main():
        cl = make_async_client(config)
        client = openai_client(fake, cl, is_async=True)
        async with await client.responses.create(model="gpt-4o", input="hi", stream=True) as stream:
            kinds = [e.type async for e in stream]
        await cl.aclose()
        return kinds

    assert asyncio.run(main())[-1] == "response.completed"
    assert only_reservation(funded)["committed"]["amount"] == responses_price(fake.last().body)


def test_denied_reservation_sends_nothing_to_the_provider(tenant, cycles_client, fake):
    tenant.budget(amount=10)  # ten microcents: less than any bound
    client = openai_client(fake, cycles_client)
    with pytest.raises(BudgetExceededError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=100)
    assert err.value.reason_code == "BUDGET_EXCEEDED"
    with pytest.raises(BudgetExceededError):
        client.responses.create(model="gpt-4o", input="hi", stream=True)
    assert fake.count() == 0
    assert tenant.balance()["spent"]["amount"] == 0


def test_denied_async_sends_nothing(tenant, config, fake):
    tenant.budget(amount=10)

    async def main():
        cl = make_async_client(config)
        client = openai_client(fake, cl, is_async=True)
        try:
            with pytest.raises(BudgetExceededError):
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        finally:
            await cl.aclose()

    asyncio.run(main())
    assert fake.count() == 0


def test_provider_error_releases(funded, cycles_client, fake):
    client = openai_client(fake, cycles_client)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "PLEASE FAIL"}])
    assert fake.count() == 1
    assert only_reservation(funded)["status"] == "RELEASED"
    assert funded.balance()["reserved"]["amount"] == 0 and funded.balance()["spent"]["amount"] == 0


def test_stream_broken_midway_commits_the_estimate(funded, cycles_client, fake):
    client = openai_client(fake, cycles_client)
    stream = client.chat.completions.create(model="gpt-4o-mini", stream=True, max_tokens=20,
                                            messages=[{"role": "user", "content": "FAIL MIDSTREAM"}])
    with pytest.raises(Exception):
        list(stream)
    res = only_reservation(funded)
    # chunks had arrived, so tokens were billed: the most it can have cost is committed, marked as such
    assert res["status"] == "COMMITTED" and res["committed"]["amount"] == res["reserved"]["amount"]
    assert res["committed_metadata"]["actual_source"] == "estimate"


def test_unknown_model_is_an_error_before_anything_is_sent(funded, cycles_client, fake):
    client = openai_client(fake, cycles_client)
    with pytest.raises(UnknownModelError, match="ft:acme-support"):
        client.chat.completions.create(model="ft:acme-support", messages=MESSAGES)
    assert fake.count() == 0 and reservations(funded) == []


def test_operator_price_table_prices_an_unknown_model(funded, cycles_client, fake):
    table = {"openai:ft:acme-support": {"input_mtok": "3", "output_mtok": "12", "cache_read_mtok": "1.5"}}
    client = openai_client(fake, cycles_client, price_table=table)
    client.chat.completions.create(model="ft:acme-support", messages=MESSAGES, max_tokens=10)
    u = usage_for(fake.last().body)
    # (uncached input x 3 + cached x 1.5 + output x 12) USD per 1e6 tokens, in microcents (x 1e8), exact here
    expected = ((u["prompt"] - u["cached"]) * 300 + u["cached"] * 150 + u["output"] * 1200)
    assert only_reservation(funded)["committed"]["amount"] == expected


def test_tokens_unit(tenant, cycles_client, fake):
    tenant.budget(amount=1_000_000, unit="TOKENS")
    client = openai_client(fake, cycles_client, unit="TOKENS")
    client.chat.completions.create(model="any-model-at-all", messages=MESSAGES, max_tokens=40)
    u = usage_for(fake.last().body)
    res = only_reservation(tenant)
    assert res["committed"] == {"unit": "TOKENS", "amount": u["prompt"] + u["output"]}


def test_shadow_runs_and_charges_nothing(tenant, cycles_client, fake):
    tenant.budget(amount=10)
    client = openai_client(fake, cycles_client, shadow=True)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert fake.count() == 1 and reservations(tenant) == []


def test_subject_action_and_idempotency_options(funded, cycles_client, fake):
    client = openai_client(fake, cycles_client, workflow="support", agent=lambda req: f"agent-{req.model}",
                           action_name="chat", idempotency_key=lambda req: req.kwargs["user"])
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user="job-7-step-1")
    res = only_reservation(funded)
    assert res["subject"] == {"tenant": funded.tenant_id, "workflow": "support", "agent": "agent-gpt-4o-mini"}
    assert res["action"]["name"] == "chat" and res["idempotency_key"] == "job-7-step-1"
