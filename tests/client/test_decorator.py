"""`@cycles`, the context, shadow mode, streaming, heartbeat and cancellation against the real server."""

from __future__ import annotations

import asyncio
import time

import pytest

from cycles.client import (BudgetExceededError, CyclesProtocolError, IdempotencyKeyReusedError, cycles,
                           get_cycles_context, set_default_client)
from faults import Script


def spent(tenant) -> int:
    return tenant.balance()["spent"]["amount"]


def reserved(tenant) -> int:
    return tenant.balance()["reserved"]["amount"]


def test_sync_guard_commits_actual_and_metrics(tenant, client, script):
    tenant.budget(amount=1_000_000)

    @cycles(5000, actual=lambda r: r["cost"], action_kind="llm.completion", action_name="gpt",
            client=client, metadata={"run": "r1"}, idempotency_key=lambda q: f"job-{q}")
    def work(q):
        ctx = get_cycles_context()
        assert ctx.decision == "ALLOW" and ctx.reservation_id and ctx.estimate == 5000
        ctx.metrics.tokens_input = 10
        ctx.commit_metadata["note"] = "hi"
        return {"cost": 1234}

    assert work("a") == {"cost": 1234}
    assert spent(tenant) == 1234 and reserved(tenant) == 0
    assert script.ops() == ["create", "commit"]  # 2 round trips; no extend for a long lease
    create, commit = script.seen
    assert create.key == "job-a" and create.body["metadata"] == {"run": "r1"}
    assert commit.key == "commit-job-a"
    assert commit.body["metrics"]["tokens_input"] == 10 and commit.body["metadata"] == {"note": "hi"}
    assert get_cycles_context() is None
    assert not list(client.journal.dir.glob("v2-*.json"))  # settled at once: no record file


def test_same_idempotency_key_runs_are_one_reservation(tenant, client):
    tenant.budget(amount=1_000_000)

    runs = []

    @cycles(100, client=client, idempotency_key="fixed-key")
    def work():
        runs.append(1)
        return 1

    work()
    # the replay answers with the finished reservation: running again would go uncharged, so it refuses
    with pytest.raises(IdempotencyKeyReusedError):
        work()
    assert spent(tenant) == 100 and runs == [1]


def test_deny_raises_typed_and_function_does_not_run(tenant, client):
    tenant.budget(amount=10)
    ran = []

    @cycles(1000, client=client, overage_policy="REJECT")
    def work():
        ran.append(1)

    with pytest.raises(BudgetExceededError) as exc:
        work()
    assert not ran and exc.value.error_code == "BUDGET_EXCEEDED" or exc.value.reason_code == "BUDGET_EXCEEDED"


def test_failure_releases_for_any_base_exception(tenant, client, script):
    tenant.budget(amount=1_000_000)

    @cycles(700, client=client)
    def boom(exc):
        raise exc

    for exc in (ValueError("x"), KeyboardInterrupt(), SystemExit(3)):
        with pytest.raises(type(exc)):
            boom(exc)
    assert reserved(tenant) == 0 and spent(tenant) == 0
    assert script.ops().count("release") == 3 and "commit" not in script.ops()
    assert all(s.body["reason"] == "guarded_method_failed" for s in script.of("release"))


def test_nested_context_is_restored(tenant, client):
    tenant.budget(amount=1_000_000)
    seen = {}

    @cycles(10, client=client, action_name="inner")
    def inner():
        return get_cycles_context()

    @cycles(20, client=client, action_name="outer")
    def outer():
        mine = get_cycles_context()
        child = inner()
        seen["parent"] = child.parent
        after = get_cycles_context()
        after.metrics.custom = {"still": "writable"}
        return mine, after

    mine, after = outer()
    assert mine is after and seen["parent"] is mine and mine.estimate == 20
    assert get_cycles_context() is None


def test_generators_commit_on_exhaustion_and_release_when_stopped_early(tenant, client, script):
    tenant.budget(amount=1_000_000)

    @cycles(300, client=client, actual=lambda ret: ret)
    def gen(n):
        for i in range(n):
            assert get_cycles_context() is not None
            yield i
        return 111

    assert list(gen(3)) == [0, 1, 2]
    assert spent(tenant) == 111
    g = gen(10)
    assert next(g) == 0
    assert get_cycles_context() is None  # not leaked into the consumer
    g.close()
    assert reserved(tenant) == 0 and script.ops()[-1] == "release"

    @cycles(400, client=None)
    async def agen(n):
        for i in range(n):
            yield i

    from cycles.client import AsyncCyclesClient

    async def main():
        async with AsyncCyclesClient(client.config) as ac:
            set_default_client(ac)
            out = [i async for i in agen(2)]
            stopped = agen(5)
            await stopped.__anext__()
            await stopped.aclose()
            return out

    assert asyncio.run(main()) == [0, 1]
    assert spent(tenant) == 111 + 400 and reserved(tenant) == 0


def test_real_shadow_mode_runs_and_holds_nothing(tenant, client, script):
    tenant.budget(amount=100)
    ran = []

    @cycles(5000, client=client, shadow=True, overage_policy="REJECT")
    def work():
        ctx = get_cycles_context()
        ran.append((ctx.shadow, ctx.decision, ctx.would_allow))
        return "done"

    assert work() == "done"
    assert ran == [(True, "DENY", False)]
    assert script.ops() == ["create"] and script.seen[0].body["dry_run"] is True
    assert spent(tenant) == 0 and reserved(tenant) == 0


def test_dry_run_keeps_published_semantics(tenant, client):
    tenant.budget(amount=100)

    @cycles(50, client=client, dry_run=True)
    def allowed():
        raise AssertionError("dry_run must not execute")

    assert allowed().decision == "ALLOW"

    @cycles(5000, client=client, dry_run=True, overage_policy="REJECT")
    def denied():
        raise AssertionError

    with pytest.raises(BudgetExceededError) as exc:
        denied()
    assert exc.value.status == 200 and exc.value.reason_code == "BUDGET_EXCEEDED"


def test_validation_before_anything_is_sent(tenant, client, script):
    with pytest.raises(ValueError):
        cycles(1.5, client=client)(lambda: 1)()
    with pytest.raises(ValueError):
        cycles(10, use_estimate_if_actual_not_provided=False)
    with pytest.raises(ValueError):
        cycles(10, ttl_ms=10)
    with pytest.raises(TypeError):
        @cycles(10, client=client)
        async def wrong_kind():
            pass

        asyncio.run(wrong_kind())
    assert script.seen == []


def test_stream_reservation_commits_usage_and_releases_on_failure(tenant, client, script):
    tenant.budget(amount=1_000_000)
    with client.stream_reservation(action={"kind": "llm.completion", "name": "m"},
                                   estimate={"unit": "USD_MICROCENTS", "amount": 9000}, idempotency_key="s1",
                                   cost_fn=lambda u: u.tokens_output * 10) as s:
        assert s.decision == "ALLOW" and s.reservation_id
        s.usage.add_input_tokens(5)
        s.usage.add_output_tokens(42)
    assert spent(tenant) == 420
    assert script.of("commit")[0].key == "commit-s1"
    assert script.of("commit")[0].body["metrics"]["tokens_output"] == 42

    with pytest.raises(RuntimeError):
        with client.stream_reservation(action={"kind": "k", "name": "n"},
                                       estimate={"unit": "USD_MICROCENTS", "amount": 9000}):
            raise RuntimeError("stream broke")
    assert script.of("release")[0].body["reason"] == "stream_failed"

    with client.stream_reservation(action={"kind": "k", "name": "n"},
                                   estimate={"unit": "USD_MICROCENTS", "amount": 77}):
        pass  # no usage: the estimate is committed
    assert spent(tenant) == 420 + 77 and reserved(tenant) == 0
    assert script.of("commit")[-1].body["metadata"] == {"actual_source": "estimate"}


def test_async_stream_reservation(tenant, make_async_client):
    tenant.budget(amount=1_000_000)

    async def main():
        async with make_async_client() as c:
            async with c.stream_reservation(action={"kind": "k", "name": "n"},
                                            estimate={"unit": "USD_MICROCENTS", "amount": 500}) as s:
                s.usage.set_actual_cost(321)

    asyncio.run(main())
    assert spent(tenant) == 321


def test_heartbeat_extends_from_remaining_ttl(tenant, make_client):
    """A short lease gets extends scheduled from remaining_ttl_ms; a long one gets none."""
    tenant.budget(amount=1_000_000)
    s = Script()
    c = make_client(s, connect_timeout=0.2, read_timeout=0.3, write_timeout=0.2)

    @cycles(100, client=c, ttl_ms=4000)
    def slow():
        # until the first extend lands (~1 s in: 4000 - rtt - 3000 reserve; the next one would be ~4 s later),
        # not a fixed sleep: on a loaded machine the heartbeat thread may run late
        deadline = time.monotonic() + 15
        while get_cycles_context().extensions < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        return get_cycles_context().extensions

    assert slow() == 1
    assert s.ops_once() == ["create", "extend", "commit"]
    assert s.of("extend")[0].body["extend_by_ms"] == 4000

    @cycles(100, client=c, ttl_ms=60_000)
    def quick():
        time.sleep(0.3)

    quick()
    assert s.ops_once()[-2:] == ["create", "commit"]


def test_async_cancellation_leaves_no_held_reservation(tenant, make_async_client):
    tenant.budget(amount=1_000_000)

    async def main():
        async with make_async_client() as c:
            @cycles(5000, client=c)
            async def long_job(ev):
                ev.set()
                await asyncio.sleep(30)

            ev = asyncio.Event()
            task = asyncio.create_task(long_job(ev))
            await ev.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert reserved(tenant) == 0 and spent(tenant) == 0


def test_async_cancellation_during_create_releases(tenant, make_async_client):
    tenant.budget(amount=1_000_000)

    async def main():
        s = Script()
        async with make_async_client(s) as c:
            @cycles(5000, client=c)
            async def job():
                await asyncio.sleep(30)

            task = asyncio.create_task(job())
            await asyncio.sleep(0)  # the create is now in flight
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(100):
                await asyncio.sleep(0.02)
                if "release" in s.ops():
                    break
            await asyncio.sleep(0.1)

    asyncio.run(main())
    assert reserved(tenant) == 0


def test_sync_default_client_and_async_default_are_independent(tenant, client, make_async_client):
    tenant.budget(amount=1_000_000)
    set_default_client(client)

    @cycles(10)
    def f():
        return 1

    assert f() == 1
    with pytest.raises(CyclesProtocolError):
        @cycles(10, tenant="bad tenant!")
        def g():
            pass

        try:
            g()
        except ValueError as exc:  # invalid subject value rejected locally
            raise CyclesProtocolError(str(exc))
