"""Redis Cluster: the cross-tenant views built from per-tenant outboxes (cycles.store.redis_outbox,
docs/redis.md "Cross-tenant views"), on a real local Redis Cluster.

What must hold: a row recorded by a script is in its tenant's outbox as soon as the script ran, so a server
that dies before any drain loses nothing (a later drain, by any server, applies it); applying a batch twice,
or two drainers at once, counts each entry once; the lag shows in /metrics and /actuator/health; a server
sees its own writes in the views at once; single-primary Redis and SQLite have no outbox at all.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_py
from redis.cluster import ClusterNode, RedisCluster

from redis_support import flush_cluster
from support import new_tenant, reserve_body, start_server

from cycles.store.base import AuditScan
from cycles.store.redis_cluster import RedisClusterStore, cluster_nodes
from cycles.store.redis_outbox import AGG, outbox_key

pytestmark = pytest.mark.timeout(180)
USD = "USD_MICROCENTS"


@pytest.fixture
def cluster_url(store_cluster_url: str) -> str:
    flush_cluster(store_cluster_url)
    return store_cluster_url


def _client(url: str) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster_nodes(url)], decode_responses=True)


def _waiting(client: RedisCluster) -> dict[str, int]:
    """Outbox entries per tenant, read straight from the cluster."""
    homes = client.smembers("cy:tenants") | client.smembers("cy:journals")
    return {h: n for h in homes if (n := client.zcard(outbox_key(h)))}


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _view(store: RedisClusterStore) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """What the cross-tenant views hold (read without a catch-up: this store wrote nothing)."""
    audit = await store.scan_audit(AuditScan(limit=1000))
    events = await store.scan_events(AuditScan(limit=1000))
    return audit, events, await store.counters()


async def _per_tenant_counters(store: RedisClusterStore) -> dict[str, int]:
    """The counters each tenant's slot keeps: what the view's must add up to."""
    total: dict[str, int] = {}
    for t in await store._tenants():
        for name, v in (await store._call(lambda t=t: store.r.hgetall(f"cy:{{{t}}}:counters"))).items():
            total[name] = total.get(name, 0) + int(v)
    return total


def _quiet_server(url: str, tmp_path: Path, **env: str) -> Any:
    """A server that drains nothing by itself: no aggregator, and no sweeper (whose analyzers read the event
    log, and so drain the server's own writes, every tick)."""
    return start_server(url, tmp_path, sweep_interval_ms=0, extra_env={"CYCLES_AGGREGATE_INTERVAL_MS": "0", **env})


def _busy_server(url: str, tmp_path: Path, **env: str) -> Any:
    srv = _quiet_server(url, tmp_path, **env)
    tenants = [new_tenant(srv) for _ in range(3)]
    for t in tenants:
        t.budget(amount=1_000)
        with t.client() as c:
            r = c.post("/v1/reservations", json=reserve_body(t, 2_000))  # denied: an event
            assert r.status_code == 409, r.text
            r = c.post("/v1/reservations", json=reserve_body(t, 400))
            assert r.status_code == 200, r.text
    return srv, tenants


def test_a_server_killed_before_any_drain_loses_nothing(cluster_url: str, tmp_path: Path) -> None:
    srv, tenants = _busy_server(cluster_url, tmp_path)
    srv.proc.send_signal(signal.SIGKILL)  # no drain ever ran (CYCLES_AGGREGATE_INTERVAL_MS=0), none on exit
    srv.proc.wait(10)
    client = _client(cluster_url)
    waiting = _waiting(client)
    assert {t.tenant_id for t in tenants} <= set(waiting), waiting
    # the operators' rows (tenant __admin__) rode in the tenants' outboxes: no script of their own
    assert client.zcard("cy:{__admin__}:audit") == 0

    async def check() -> None:
        store = RedisClusterStore(cluster_url)
        try:
            audit, events, counters = await _view(store)
            assert audit == [] and events == [] and counters == {}  # nothing applied yet: eventual
            stats = await store.outbox.drain_all()
            assert stats["applied"] == sum(waiting.values()) and stats["waiting"] == len(waiting)
            audit, events, counters = await _view(store)
            assert {r["tenant_id"] for r in audit} == {"__admin__"}  # the operator's rows (no runtime audit)
            denied = [e for e in events if e["event_type"] == "reservation.denied"]
            assert sorted(e["tenant_id"] for e in denied) == sorted(t.tenant_id for t in tenants)
            assert counters["tenants.ACTIVE"] == 3 and counters["budgets.ACTIVE"] == 3
            assert counters == await _per_tenant_counters(store)
            # the operators' rows are in their owner's slot too, where a filtered read finds them
            mine = await store.scan_audit(AuditScan(tenant="__admin__", limit=1000))
            assert sorted(r["log_id"] for r in mine) == sorted(r["log_id"] for r in audit
                                                               if r["tenant_id"] == "__admin__")
            assert len(mine) >= 6  # each tenant's creation and its API key
        finally:
            await store.close()

    _run(check())
    assert _waiting(client) == {}  # trimmed once applied
    client.close()


def test_a_batch_applied_twice_counts_once(cluster_url: str, tmp_path: Path) -> None:
    srv, tenants = _busy_server(cluster_url, tmp_path)
    srv.stop()
    client = _client(cluster_url)
    tenant = tenants[0].tenant_id
    members = client.zrange(outbox_key(tenant), 0, -1)
    assert len(members) >= 3

    async def check() -> None:
        store = RedisClusterStore(cluster_url)
        try:
            first = await store.outbox.apply(tenant, members[:2])
            again = await store.outbox.apply(tenant, members)  # a drainer that read before the first applied
            assert first[1] == 2 and again == (first[0] + len(members) - 2, len(members) - 2)
            assert await store.outbox.apply(tenant, members) == (again[0], 0)
            assert await store.outbox.apply(tenant, members[:1]) == (first[0] - 1, 0)
            counts = await store.counters()
            assert counts["tenants.ACTIVE"] == 1 and counts["budgets.ACTIVE"] == 1
            assert int(client.hget(AGG + "stats", "applied")) == len(members)
            audit = await store.scan_audit(AuditScan(limit=1000))
            assert len(audit) == len({r["log_id"] for r in audit})
        finally:
            await store.close()

    _run(check())
    client.close()


def test_an_outbox_sequence_taken_back_by_a_failover_loses_no_new_entry(cluster_url: str, tmp_path: Path) -> None:
    srv, tenants = _busy_server(cluster_url, tmp_path)
    srv.stop()
    client = _client(cluster_url)
    tenant = tenants[0].tenant_id
    seq_key = f"cy:{{{tenant}}}:outbox:seq"

    async def check() -> None:
        store = RedisClusterStore(cluster_url)
        try:
            await store.outbox.drain_all()
            before = (await store.counters())["budgets.ACTIVE"]
            # the promoted replica lacked the last two entries (asynchronous replication): its sequence is
            # two behind the cursor the view holds, its last time whatever it had then
            last = client.hgetall(seq_key)
            client.hset(seq_key, mapping={"s": int(last["s"]) - 2, "m": int(last["m"]) - 50})
            await asyncio.sleep(0.01)
            await store.create_budget({"tenant_id": tenant, "scope": f"tenant:{tenant}/workspace:w2", "unit": USD,
                                       "allocated": 5})
            members = client.zrange(outbox_key(tenant), 0, -1)
            assert len(members) == 1 and members[0].startswith(f"{int(last['s']) - 1}\n")  # a sequence reused
            store.outbox.dirty.clear()
            await store.outbox.drain_all()
            assert (await store.counters())["budgets.ACTIVE"] == before + 1
            assert client.zcard(outbox_key(tenant)) == 0
        finally:
            await store.close()

    _run(check())
    client.close()


def test_two_drainers_at_once_apply_each_entry_once(cluster_url: str, tmp_path: Path) -> None:
    srv = _quiet_server(cluster_url, tmp_path)
    try:
        tenants = [new_tenant(srv) for _ in range(8)]
        for t in tenants:
            t.budget(amount=10_000)
            with t.client() as c:
                for _ in range(5):
                    assert c.post("/v1/reservations", json=reserve_body(t, 10)).status_code == 200
    finally:
        srv.stop()
    client = _client(cluster_url)
    entries = sum(_waiting(client).values())

    async def check() -> None:
        a, b = RedisClusterStore(cluster_url), RedisClusterStore(cluster_url)
        try:
            # small batches so the two interleave within tenants
            import cycles.store.redis_outbox as ro
            ro.BATCH = 2
            try:
                stats = await asyncio.gather(a.outbox.drain_all(), b.outbox.drain_all(), a.outbox.drain_all())
            finally:
                ro.BATCH = 500
            assert sum(s["applied"] for s in stats) == entries
            assert int(client.hget(AGG + "stats", "applied")) == entries
            audit, events, counters = await _view(a)
            assert len(audit) == len({r["log_id"] for r in audit})
            assert counters == await _per_tenant_counters(a)
            assert counters["budgets.ACTIVE"] == 8
        finally:
            await a.close()
            await b.close()

    _run(check())
    assert _waiting(client) == {}
    client.close()


def _health(srv: Any) -> dict[str, Any]:
    r = httpx.get(srv.base_url + "/actuator/health", timeout=10)
    assert r.status_code == 200
    return r.json()


def _metric(srv: Any, name: str) -> float:
    text = httpx.get(srv.base_url + "/metrics", timeout=10).text
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return float(line.split()[1])


def test_the_lag_shows_in_metrics_and_health(cluster_url: str, tmp_path: Path) -> None:
    # no server drains: the lag grows past the bound, health stays UP and says so
    srv, _ = _busy_server(cluster_url, tmp_path, CYCLES_OUTBOX_LAG_BOUND_S="0.5")
    try:
        time.sleep(1.2)
        body = _health(srv)
        assert body["status"] == "UP"
        out = body["details"]["clusterOutbox"]
        assert out["over_bound"] is True and out["tenants_waiting"] >= 3 and out["lag_seconds"] > 1
        assert _metric(srv, "cycles_cluster_outbox_lag_seconds") > 1
        assert _metric(srv, "cycles_cluster_outbox_tenants_waiting") >= 3
        assert _metric(srv, "cycles_cluster_outbox_entries_applied_total") == 0
    finally:
        srv.stop()
    # a draining server catches up: lag back under the bound, nothing waiting, entries counted
    srv = start_server(cluster_url, tmp_path, extra_env={"CYCLES_AGGREGATE_INTERVAL_MS": "100",
                                                         "CYCLES_OUTBOX_LAG_BOUND_S": "0.5"})
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = _health(srv)["details"]["clusterOutbox"]
            if out["draining"] and out["tenants_waiting"] == 0:
                break
            time.sleep(0.1)
        assert out["draining"] and out["tenants_waiting"] == 0 and out["over_bound"] is False, out
        assert _metric(srv, "cycles_cluster_outbox_entries_applied_total") > 0
        assert _metric(srv, "cycles_cluster_outbox_lag_seconds") < 0.5
    finally:
        srv.stop()


def test_a_server_sees_its_own_writes_at_once(cluster_url: str, tmp_path: Path) -> None:
    # neither server drains in the background: what shows at once is a server's catch-up of its own writes
    one, two = _quiet_server(cluster_url, tmp_path), _quiet_server(cluster_url, tmp_path)
    try:
        def seen(srv: Any, **params: str) -> bool:
            with srv.admin() as c:
                logs = c.get("/v1/admin/audit/logs", params={"limit": 100, **params}).json()["logs"]
            return any(r.get("request_id") == request_id for r in logs)

        def active(srv: Any) -> int:
            with srv.admin() as c:
                return c.get("/v1/admin/overview").json()["tenant_counts"]["active"]

        with one.admin() as c:
            r = c.post("/v1/admin/tenants", json={"tenant_id": f"t-{uuid.uuid4().hex[:12]}", "name": "x"})
            assert r.status_code == 201
            request_id = r.headers["x-request-id"]
        # another server: not yet (the operator's row and the count wait in the tenant's outbox) ...
        assert not seen(two) and not seen(two, tenant_id="__admin__") and active(two) == 0
        # ... the writer: at once, in every cross-tenant view ...
        assert seen(one) and seen(one, tenant_id="__admin__") and active(one) == 1
        # ... and the other server too, once anyone drained
        assert seen(two) and seen(two, tenant_id="__admin__") and active(two) == 1
    finally:
        one.stop()
        two.stop()


def test_single_primary_redis_has_no_outbox(redis_url: str, tmp_path: Path) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/13"
    redis_py.Redis.from_url(url).flushdb()
    srv = start_server(url, tmp_path)
    try:
        t = new_tenant(srv)
        t.budget(amount=1_000)
        with t.client() as c:
            assert c.post("/v1/reservations", json=reserve_body(t, 10)).status_code == 200
        assert "clusterOutbox" not in (_health(srv).get("details") or {})
        assert "cycles_cluster_outbox" not in httpx.get(srv.base_url + "/metrics", timeout=10).text
    finally:
        srv.stop()
    r = redis_py.Redis.from_url(url)
    assert not list(r.scan_iter(match="*outbox*")) and not list(r.scan_iter(match="cy:{agg}*"))
    assert r.zcard("cy:audit") > 0  # the global log, inline, as before
