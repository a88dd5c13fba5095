"""The SDK end to end against a server on the Redis store (the other tests use the SQLite session server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cycles.client import CyclesClient, CyclesConfig, cycles, get_cycles_context
from faults import FaultTransport, Script
from redis_support import RedisServer
from support import new_tenant, start_server


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdk-redis")
    rs = RedisServer(tmp / "redis").start()
    srv = start_server(rs.url, tmp)
    yield srv
    srv.stop()
    rs.stop()


def test_guarded_calls_and_recovery_on_redis(redis_server, tmp_path: Path):
    t = new_tenant(redis_server)
    t.budget(amount=1_000_000)
    s = Script([("commit", "lose_response")])
    cfg = CyclesConfig(base_url=redis_server.base_url, api_key=t.key, tenant=t.tenant_id,
                       journal_dir=str(tmp_path / "j"), retry_initial_delay=0.05, retry_max_delay=0.2)
    with CyclesClient(cfg, transport=FaultTransport(s)) as c:
        @cycles(1000, actual=600, client=c, idempotency_key="redis-1")
        def work():
            assert get_cycles_context().decision == "ALLOW"
            return 1

        work()
        assert c.flush(10)

        @cycles(500, client=c)
        def fails():
            raise RuntimeError("x")

        with pytest.raises(RuntimeError):
            fails()
    assert [x.key for x in s.of("commit")] == ["commit-redis-1"] * 2
    bal = t.balance()
    assert bal["spent"]["amount"] == 600 and bal["reserved"]["amount"] == 0
