"""The `cycles` pytest plugin: a real in-process server through the transport seam (no mocks)."""

from __future__ import annotations

import asyncio

import pytest

from cycles.client import BudgetExceededError, ReservationExpiredError, cycles, get_cycles_context


def test_plugin_fixture_guards_sync_code(cycles_tenant):
    cycles_tenant.budget(10_000)
    client = cycles_tenant.client()

    @cycles(3000, actual=lambda r: r * 100, client=client, action_kind="tool", action_name="search")
    def search(n):
        assert get_cycles_context().decision == "ALLOW"
        return n

    assert search(7) == 7
    assert cycles_tenant.spent() == 700
    with pytest.raises(BudgetExceededError):
        cycles(50_000, client=client, overage_policy="REJECT")(lambda: None)()
    client.close()


def test_plugin_fixture_async_and_streaming(cycles_tenant):
    cycles_tenant.budget(10_000)

    async def main():
        async with cycles_tenant.async_client() as c:
            @cycles(1000, actual=400, client=c)
            async def step():
                return 1

            await step()
            async with c.stream_reservation(action={"kind": "llm", "name": "m"},
                                            estimate={"unit": "USD_MICROCENTS", "amount": 900}) as s:
                s.usage.set_actual_cost(250)

    asyncio.run(main())
    assert cycles_tenant.spent() == 650 and cycles_tenant.reserved() == 0


def test_plugin_server_sweeps_expired_reservations(cycles_server):
    t = cycles_server.new_tenant()
    t.budget(5000)
    with t.client(heartbeat_enabled=False) as c:
        r = c.create_reservation({"idempotency_key": "k", "subject": {"tenant": t.tenant_id},
                                  "action": {"kind": "k", "name": "n"},
                                  "estimate": {"unit": "USD_MICROCENTS", "amount": 1000},
                                  "ttl_ms": 1000, "grace_period_ms": 0})
        assert t.reserved() == 1000
        import time

        time.sleep(1.4)
        with pytest.raises(ReservationExpiredError):
            c.get_reservation(r.reservation_id)
        assert c.list_reservations(tenant=t.tenant_id).reservations[0].status == "EXPIRED"
        assert t.reserved() == 0
