"""The Redis store on a real Redis Cluster: a primary killed under load (docs/redis.md "Redis Cluster").

The store-level and server suites run on the cluster through conftest.STORES (kind `redis-cluster`); this
file holds what only a cluster has: a shard's primary dies while clients reserve and commit, its replica is
promoted, and no committed spend is lost or counted twice.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.cluster import ClusterNode, RedisCluster

from redis_support import RedisClusterNodes, redis_binary
from support import Tenant, new_tenant, start_server

USD = "USD_MICROCENTS"
HOLD, COST = 10, 7


def _post(c: httpx.Client, path: str, body: dict[str, Any], deadline: float) -> httpx.Response | None:
    """POST until a definitive answer (not a 5xx, not a dropped connection), with the same body and so the
    same idempotency key: what a client does through an outage."""
    while time.monotonic() < deadline:
        try:
            r = c.post(path, json=body)
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        if r.status_code < 500:
            return r
        time.sleep(0.05)
    return None


def _load(t: Tenant, stop: threading.Event, deadline: float, out: dict[str, Any]) -> None:
    acked: list[float] = []
    other: list[str] = []
    with t.client(timeout=5) as c:
        while not stop.is_set() and time.monotonic() < deadline:
            body = {"idempotency_key": uuid.uuid4().hex, "subject": t.subject(),
                    "action": {"kind": "llm.completion", "name": "m"}, "estimate": {"unit": USD, "amount": HOLD}}
            r = _post(c, "/v1/reservations", body, deadline)
            if r is None or r.status_code != 200:
                other.append("reserve " + ("timeout" if r is None else r.text))
                continue
            rid = r.json()["reservation_id"]
            r = _post(c, f"/v1/reservations/{rid}/commit",
                      {"idempotency_key": uuid.uuid4().hex, "actual": {"unit": USD, "amount": COST}}, deadline)
            if r is None or r.status_code != 200:
                other.append("commit " + ("timeout" if r is None else r.text))
                continue
            acked.append(time.monotonic())
    out[t.tenant_id] = {"acked": acked, "other": other}


def test_a_primary_killed_under_load_loses_no_committed_spend(tmp_path: Path) -> None:
    redis_binary()
    # two replicas a shard: after the failover the promoted one still has a replica to acknowledge writes
    rc = RedisClusterNodes(tmp_path / "cluster", replicas=2, node_timeout_ms=1000).start()
    # sync_replicas=1: an answer means one of the shard's replicas has the write (docs/redis.md)
    srv = start_server(rc.url + "?sync_replicas=1", tmp_path)
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in rc.nodes[:3]])
    try:
        tenants = [new_tenant(srv) for _ in range(6)]
        for t in tenants:
            t.budget(amount=10**12)
        victim_port = client.get_node_from_key(f"cy:{{{tenants[0].tenant_id}}}:tenant").port
        victim = next(n for n in rc.nodes if n.port == victim_port)
        on_victim = [t for t in tenants if client.get_node_from_key(f"cy:{{{t.tenant_id}}}:tenant").port == victim_port]
        stop, results = threading.Event(), {}
        deadline = time.monotonic() + 60
        threads = [threading.Thread(target=_load, args=(t, stop, deadline, results)) for t in tenants]
        for th in threads:
            th.start()
        time.sleep(2)
        killed_at = time.monotonic()
        victim.kill()  # SIGKILL: the replica is promoted after the node timeout (1 s) and an election
        rc.wait_failover(victim_port, timeout_s=30)
        promoted_at = time.monotonic()
        time.sleep(2)
        stop.set()
        for th in threads:
            th.join(70)
        # every request got its answer in the end, and the shard that failed over served again
        others = {k: v["other"][:3] for k, v in results.items() if v["other"]}
        assert not others, others
        for t in on_victim:
            assert any(at > promoted_at for at in results[t.tenant_id]["acked"]), "no commit after the promotion"
        assert promoted_at - killed_at < 30
        # no acknowledged commit lost, none counted twice, no hold left behind
        for t in tenants:
            bal = t.balance()
            acked = len(results[t.tenant_id]["acked"])
            assert acked > 0
            assert bal["spent"]["amount"] == COST * acked, (t.tenant_id, bal, acked)
            assert bal["reserved"]["amount"] == 0
    finally:
        client.close()
        srv.stop()
        rc.stop()
