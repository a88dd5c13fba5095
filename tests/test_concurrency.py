"""Shared budgets are never oversubscribed: many threads, many client processes, many server processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from support import USD, Server, new_tenant, reserve_body, start_server

COST = 1_000
AFFORDABLE = 40


def _reserve_commit(base_url: str, key: str, tenant_id: str, attempts: int) -> dict[str, int]:
    counts = {"ok": 0, "denied": 0, "other": 0}
    with httpx.Client(base_url=base_url, headers={"X-Cycles-API-Key": key}, timeout=60) as c:
        for _ in range(attempts):
            body = {"idempotency_key": uuid.uuid4().hex, "subject": {"tenant": tenant_id, "agent": "a"},
                    "action": {"kind": "llm", "name": "m"}, "estimate": {"unit": USD, "amount": COST}}
            r = c.post("/v1/reservations", json=body)
            if r.status_code == 409 and r.json()["error"] == "BUDGET_EXCEEDED":
                counts["denied"] += 1
                continue
            if r.status_code != 200:
                counts["other"] += 1
                continue
            rid = r.json()["reservation_id"]
            r = c.post(f"/v1/reservations/{rid}/commit",
                       json={"idempotency_key": uuid.uuid4().hex, "actual": {"unit": USD, "amount": COST}})
            counts["ok" if r.status_code == 200 else "other"] += 1
    return counts


def _provision(server: Server):
    t = new_tenant(server)
    t.budget("", COST * AFFORDABLE)
    t.budget("agent:a", COST * AFFORDABLE * 10)
    return t


def _check(t, results: list[dict[str, int]], attempts: int) -> None:
    ok = sum(r["ok"] for r in results)
    assert sum(r["other"] for r in results) == 0, results
    assert ok == AFFORDABLE, results
    assert sum(r["denied"] for r in results) == attempts - AFFORDABLE
    root = t.balance("")
    assert root["remaining"]["amount"] == 0
    assert root["spent"]["amount"] == COST * AFFORDABLE
    assert root["reserved"]["amount"] == 0
    agent = t.balance("agent:a")
    assert agent["spent"]["amount"] == COST * AFFORDABLE


def test_threads_never_oversubscribe(server: Server) -> None:
    t = _provision(server)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: _reserve_commit(server.base_url, t.key, t.tenant_id, 6), range(16)))
    _check(t, results, 96)


def test_reserves_in_flight_are_counted(server: Server) -> None:
    """Holds, not only commits, consume budget: 64 concurrent reserves, no commits, exactly the affordable few pass."""
    t = new_tenant(server)
    t.budget("", COST * 10)

    def one(_: int) -> int:
        with t.client() as c:
            return c.post("/v1/reservations", json=reserve_body(t, COST)).status_code

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(one, range(64)))
    assert codes.count(200) == 10
    assert codes.count(409) == 54
    assert t.balance("")["reserved"]["amount"] == COST * 10
    assert t.balance("")["remaining"]["amount"] == 0


_CLIENT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from test_concurrency import _reserve_commit
    print(json.dumps(_reserve_commit(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    """
)


def _run_clients(urls: list[str], key: str, tenant_id: str, processes: int, attempts: int) -> list[dict[str, int]]:
    code = _CLIENT.format(tests=str(Path(__file__).parent))
    procs = [subprocess.Popen([sys.executable, "-c", code, urls[i % len(urls)], key, tenant_id, str(attempts)],
                              stdout=subprocess.PIPE, text=True) for i in range(processes)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0
        results.append(json.loads(out))
    return results


def test_client_processes_never_oversubscribe(server: Server) -> None:
    t = _provision(server)
    _check(t, _run_clients([server.base_url], t.key, t.tenant_id, 6, 12), 72)


@pytest.mark.slow
def test_server_processes_on_one_store_file(tmp_path: Path, store_kind: str) -> None:
    """Two `cycles serve` instances (one with --workers 2) on the same store stay exactly correct together."""
    if store_kind != "sqlite":
        pytest.skip("this layout is the embedded store's multi-process case")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = start_server(url, tmp_path, workers=2)
    second = start_server(url, tmp_path)
    try:
        t = _provision(first)
        results = _run_clients([first.base_url, second.base_url], t.key, t.tenant_id, 6, 12)
        _check(t, results, 72)
        # both servers see the same ledger
        with httpx.Client(base_url=second.base_url, headers={"X-Cycles-API-Key": t.key}) as c:
            r = c.get("/v1/balances", params={"tenant": t.tenant_id})
        assert r.json()["balances"][0]["spent"]["amount"] == COST * AFFORDABLE
    finally:
        first.stop()
        second.stop()
