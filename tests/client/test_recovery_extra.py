"""Durable-recovery behaviour beyond the scenario catalogue: auth failure, exhaustion, terminal
rejections, bounded flush, the hot-path journal cost, and the async engine."""

from __future__ import annotations

import asyncio
import json
import time

from cycles.client import cycles
from faults import Script

ERR = lambda code, msg="x": {"error": code, "message": msg, "request_id": "req_1"}  # noqa: E731


def spent(tenant) -> int:
    return tenant.balance()["spent"]["amount"]


def reserved(tenant) -> int:
    return tenant.balance()["reserved"]["amount"]


def records(journal_dir):
    return sorted(journal_dir.rglob("v2-*.json"))


def test_auth_failure_keeps_record_and_never_releases(tenant, make_client, journal_dir):
    tenant.budget(amount=1_000_000)
    s = Script([("commit", "status", (401, ERR("UNAUTHORIZED")))])
    c = make_client(s)

    @cycles(1000, actual=500, client=c)
    def work():
        return 1

    work()
    assert c.flush(2)
    assert s.ops() == ["create", "commit"]  # no retry in this run, no release
    (rec,) = records(journal_dir)
    assert reserved(tenant) == 1000  # still held: never released after the work ran
    # a restart with fixed credentials settles it
    c2 = make_client()
    report = c2.recover_pending()
    assert len(report.settled) == 1 and records(journal_dir) == [] and spent(tenant) == 500


def test_retry_exhaustion_keeps_record_for_the_next_process(tenant, make_client, journal_dir):
    tenant.budget(amount=1_000_000)
    s = Script([("commit", "status", (503, ERR("INTERNAL_ERROR")))] * 3)
    c = make_client(s, retry_max_attempts=3)

    @cycles(1000, actual=640, client=c)
    def work():
        return 1

    work()
    assert c.flush(5)
    assert len(s.of("commit")) == 3 and len({x.key for x in s.of("commit")}) == 1
    assert len(records(journal_dir)) == 1
    report = make_client().recover_pending()
    assert len(report.settled) == 1 and spent(tenant) == 640 and records(journal_dir) == []


def test_understood_rejection_removes_record_without_release(tenant, make_client, journal_dir, caplog):
    tenant.budget(amount=1_000_000)
    s = Script([("commit", "status", (409, ERR("RESERVATION_FINALIZED")))])
    c = make_client(s)

    @cycles(1000, actual=10, client=c)
    def work():
        return 1

    work()
    assert c.flush(2)
    assert s.ops() == ["create", "commit"] and records(journal_dir) == []
    assert any("rejected" in r.getMessage() for r in caplog.records)


def test_bounded_flush_leaves_unresolved_record_intact(tenant, make_client, journal_dir):
    tenant.budget(amount=1_000_000)
    s = Script([("commit", "status", (429, ERR("LIMIT_EXCEEDED"), {"Retry-After": "30"}))])
    c = make_client(s)

    @cycles(1000, actual=10, client=c)
    def work():
        return 1

    work()
    t0 = time.monotonic()
    assert c.flush(0.3) is False
    assert time.monotonic() - t0 < 1.5
    (rec,) = records(journal_dir)
    assert json.loads(rec.read_text())["not_before_ms"] > time.time() * 1000 + 25_000


def test_hot_path_writes_only_the_intent_log(tenant, make_client, journal_dir):
    tenant.budget(amount=1_000_000)
    c = make_client()

    @cycles(10, actual=5, client=c)
    def work():
        return 1

    for _ in range(3):
        work()
    assert records(journal_dir) == []
    (wal,) = list(journal_dir.rglob("wal-*.log"))
    ops = [json.loads(line)["op"] for line in wal.read_text().splitlines()]
    assert ops == ["put", "done"] * 3
    c.close()
    assert list(journal_dir.rglob("wal-*.log")) == []  # nothing pending: the log is removed at close


def test_journal_fsync_option(tenant, make_client, journal_dir):
    tenant.budget(amount=1_000_000)
    c = make_client(journal_fsync=True)

    @cycles(10, actual=5, client=c)
    def work():
        return 1

    work()
    assert spent(tenant) == 5


def test_async_lost_commit_response_recovers_with_same_key(tenant, make_async_client, journal_dir):
    tenant.budget(amount=1_000_000)
    s = Script([("commit", "lose_response")])

    async def main():
        async with make_async_client(s) as c:
            @cycles(2000, actual=1500, client=c, idempotency_key="async-k")
            async def work():
                await asyncio.sleep(0)
                return 1

            await work()
            assert await c.flush(10)

    asyncio.run(main())
    assert [x.key for x in s.of("commit")] == ["commit-async-k"] * 2
    assert spent(tenant) == 1500 and records(journal_dir) == []


def test_journal_disabled_still_recovers_in_memory(tenant, make_client, journal_dir):
    tenant.budget(amount=1_000_000)
    s = Script([("commit", "connect_error")])
    c = make_client(s, journal_enabled=False)

    @cycles(10, actual=7, client=c)
    def work():
        return 1

    work()
    assert c.flush(5) and spent(tenant) == 7 and not journal_dir.exists()
