"""Caller-chosen idempotency keys never under-charge silently (issue 15, item 2), against the real
server app in process (the `cycles` pytest plugin)."""

from __future__ import annotations

import hashlib
import warnings

import pytest

from cycles.client import (Action, Amount, CommitRequest, IdempotencyKeyReusedError, IdempotencyKeyWarning,
                           ReservationCreateRequest, Subject, cycles)
from cycles.client.core import derive_key


def test_docs_example_key_names_the_unit_of_work_and_charges_every_call(cycles_tenant) -> None:
    cycles_tenant.budget(100_000_000)
    client = cycles_tenant.client()

    # the docs/sdk.md pattern: the key names the job and the step, stable in any process
    @cycles(estimate=lambda job, step, prompt: 2_000 * len(prompt), actual=lambda r: r, client=client,
            action_kind="llm.completion", action_name="gpt-4o",
            idempotency_key=lambda job, step, prompt: f"{job}-step-{step}")
    def ask(job: str, step: int, prompt: str) -> int:
        return 1_000

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ask("job-42", 1, "same prompt") == 1_000
        assert ask("job-42", 2, "same prompt") == 1_000
    client.close()
    assert cycles_tenant.spent() == 2_000


def test_reusing_a_finished_calls_key_raises_before_the_work_runs(cycles_tenant) -> None:
    cycles_tenant.budget(100_000_000)
    client = cycles_tenant.client()
    runs = []

    # the old docs example: a key derived from the prompt alone repeats for a repeated prompt
    @cycles(estimate=5_000, actual=lambda r: r, client=client,
            idempotency_key=lambda prompt: "job-42-" + hashlib.sha256(prompt.encode()).hexdigest()[:16])
    def ask(prompt: str) -> int:
        runs.append(prompt)
        return 1_000

    assert ask("hello") == 1_000
    with pytest.raises(IdempotencyKeyReusedError, match="already used by a finished call"):
        ask("hello")
    client.close()
    assert runs == ["hello"] and cycles_tenant.spent() == 1_000


def test_commit_key_colliding_with_a_different_commit_warns(cycles_tenant) -> None:
    cycles_tenant.budget(100_000_000)
    client = cycles_tenant.client()
    # another program already committed a different reservation under the key this call will derive
    other = client.create_reservation(ReservationCreateRequest(
        idempotency_key="other-reserve", subject=Subject(tenant=cycles_tenant.tenant_id),
        action=Action(kind="llm.completion", name="x"), estimate=Amount(unit="USD_MICROCENTS", amount=5_000)))
    client.commit_reservation(other.reservation_id, CommitRequest(
        idempotency_key=derive_key("commit", "shared"), actual=Amount(unit="USD_MICROCENTS", amount=700)))

    @cycles(estimate=5_000, actual=lambda r: r, client=client, idempotency_key="shared")
    def work() -> int:
        return 1_000

    with pytest.warns(IdempotencyKeyWarning, match="was not charged"):
        assert work() == 1_000
    client.close()


def test_async_reuse_raises_too(cycles_tenant) -> None:
    import asyncio

    cycles_tenant.budget(100_000_000)

    async def main() -> list[str]:
        client = cycles_tenant.async_client()
        runs: list[str] = []

        @cycles(estimate=5_000, actual=lambda r: r, client=client, idempotency_key="job-7-step-1")
        async def ask(prompt: str) -> int:
            runs.append(prompt)
            return 1_000

        await ask("a")
        with pytest.raises(IdempotencyKeyReusedError):
            await ask("b")
        await client.aclose()
        return runs

    assert asyncio.run(main()) == ["a"]
    assert cycles_tenant.spent() == 1_000
