"""Redis store behaviour that only a shared network store has: slots, scripts, outages, many servers."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import redis
from redis.crc import key_slot

from redis_support import RedisServer
from support import USD, Server, new_tenant, reserve_body, start_server


@pytest.fixture
def rs(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def srv(rs: RedisServer, tmp_path: Path) -> Iterator[Server]:
    s = start_server(rs.url, tmp_path)
    yield s
    s.stop()


def _cycle(t, c: httpx.Client, amount: int = 100) -> str:
    r = c.post("/v1/reservations", json=reserve_body(t, amount, subject=t.subject(agent="a")))
    assert r.status_code == 200, r.text
    rid = r.json()["reservation_id"]
    r = c.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": uuid.uuid4().hex,
                                                       "actual": {"unit": USD, "amount": amount}})
    assert r.status_code == 200, r.text
    return rid


def test_every_key_of_a_tenant_is_in_one_slot(rs: RedisServer, srv: Server) -> None:
    t = new_tenant(srv)
    t.budget("", 10_000)
    t.budget("agent:a", 10_000)
    with t.client() as c:
        rid = _cycle(t, c)
        c.post("/v1/reservations", json=reserve_body(t, 10, subject=t.subject(agent="a")))
        c.post("/v1/events", json={"idempotency_key": "ev", "subject": t.subject(agent="a"),
                                   "action": {"kind": "k", "name": "n"}, "actual": {"unit": USD, "amount": 5}})
    assert rid.startswith(f"rsv_{t.tenant_id}.")
    client = redis.Redis(port=rs.port, decode_responses=True)
    keys = [k for k in client.scan_iter(match=f"*{t.tenant_id}*")]
    tagged = [k for k in keys if k.startswith(f"cy:{{{t.tenant_id}}}:")]
    assert len(tagged) >= 8  # tenant, 2 budgets, budget index, reservations, indexes, idempotency, event
    assert len({key_slot(k.encode()) for k in tagged}) == 1
    assert set(keys) - set(tagged) == set()  # api keys are looked up by prefix, not tenant id


def test_scripts_reload_after_script_flush(rs: RedisServer, srv: Server) -> None:
    t = new_tenant(srv)
    t.budget("", 10_000)
    with t.client() as c:
        _cycle(t, c)
        redis.Redis(port=rs.port).script_flush()
        _cycle(t, c)
    assert t.balance("")["spent"]["amount"] == 200


def test_outage_fails_fast_and_recovers_with_the_same_answers(rs: RedisServer, srv: Server) -> None:
    t = new_tenant(srv)
    t.budget("", 10_000)
    body = reserve_body(t, 700, key="before-outage")
    with t.client() as c:
        first = c.post("/v1/reservations", json=body)
        assert first.status_code == 200
        rs.kill()
        started = time.monotonic()
        r = c.post("/v1/reservations", json=reserve_body(t, 1))
        assert time.monotonic() - started < 3
        assert r.status_code == 503 and r.json()["error"] == "INTERNAL_ERROR"
        assert set(r.json()) == {"error", "message", "request_id", "trace_id"}
        h = httpx.get(srv.base_url + "/actuator/health")
        assert h.status_code == 503 and h.json() == {"status": "DOWN"}
        rs.start()
        deadline = time.monotonic() + 10
        while httpx.get(srv.base_url + "/actuator/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        again = c.post("/v1/reservations", json=body)
        assert again.status_code == 200
        assert again.json()["reservation_id"] == first.json()["reservation_id"]
    assert t.balance("")["reserved"]["amount"] == 700


def test_four_servers_sixty_four_clients_one_budget(rs: RedisServer, tmp_path: Path) -> None:
    servers = [start_server(rs.url, tmp_path) for _ in range(4)]
    try:
        t = new_tenant(servers[0])
        t.budget("", 100 * 50)
        t.budget("agent:a", 10**9)

        def client(i: int) -> tuple[int, int]:
            ok = denied = 0
            base = servers[i % 4].base_url
            with httpx.Client(base_url=base, headers={"X-Cycles-API-Key": t.key}, timeout=60) as c:
                for _ in range(3):
                    r = c.post("/v1/reservations", json=reserve_body(t, 100, subject=t.subject(agent="a")))
                    if r.status_code == 409:
                        assert r.json()["error"] == "BUDGET_EXCEEDED"
                        denied += 1
                        continue
                    assert r.status_code == 200, r.text
                    rid = r.json()["reservation_id"]
                    r = c.post(f"/v1/reservations/{rid}/commit",
                               json={"idempotency_key": uuid.uuid4().hex, "actual": {"unit": USD, "amount": 100}})
                    assert r.status_code == 200, r.text
                    ok += 1
            return ok, denied

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(client, range(64)))
        assert sum(ok for ok, _ in results) == 50
        assert sum(d for _, d in results) == 64 * 3 - 50
        root = t.balance("")
        assert root["remaining"]["amount"] == 0 and root["spent"]["amount"] == 5_000
        assert root["reserved"]["amount"] == 0
    finally:
        for s in servers:
            s.stop()


def test_many_sweepers_return_each_lease_once(rs: RedisServer, tmp_path: Path) -> None:
    servers = [start_server(rs.url, tmp_path, sweep_interval_ms=20) for _ in range(3)]
    try:
        t = new_tenant(servers[0])
        t.budget("", 10_000)
        with t.client() as c:
            for _ in range(30):
                r = c.post("/v1/reservations", json=reserve_body(t, 100, ttl_ms=4000, grace_period_ms=0))
                assert r.status_code == 200
        assert t.balance("")["reserved"]["amount"] == 3_000  # (a TTL that outlives the 30 reserves on a loaded machine)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and t.balance("")["reserved"]["amount"]:
            time.sleep(0.2)
        bal = t.balance("")
        assert bal["reserved"]["amount"] == 0
        assert bal["remaining"]["amount"] == 10_000
        with t.client() as c:
            listed = c.get("/v1/reservations", params={"status": "EXPIRED", "limit": 200}).json()["reservations"]
        assert len(listed) == 30
    finally:
        for s in servers:
            s.stop()


@pytest.mark.slow
def test_redis_killed_under_load_loses_nothing_and_charges_nothing_twice(rs: RedisServer, srv: Server) -> None:
    """Clients retry with the same keys through a kill -9 of Redis (AOF fsync always) and its restart."""
    t = new_tenant(srv)
    t.budget("", 10**12)
    stop = threading.Event()
    outcomes: list[dict] = []
    failures_seen = []
    lock = threading.Lock()

    def send(c: httpx.Client, path: str, body: dict) -> httpx.Response:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = c.post(path, json=body)
                if r.status_code != 503:
                    return r
                failures_seen.append(503)
            except httpx.TransportError:
                failures_seen.append("transport")
            assert time.monotonic() < deadline, "server never recovered"
            time.sleep(0.05)

    def worker(i: int) -> None:
        with t.client(timeout=10) as c:
            n = 0
            while not stop.is_set():
                n += 1
                amount = 1_000 + i * 10 + n
                rk, ck = f"r-{i}-{n}", f"c-{i}-{n}"
                first = send(c, "/v1/reservations", reserve_body(t, amount, key=rk))
                assert first.status_code == 200, first.text
                rid = first.json()["reservation_id"]
                again = send(c, "/v1/reservations", reserve_body(t, amount, key=rk))
                assert again.json()["reservation_id"] == rid
                commit = {"idempotency_key": ck, "actual": {"unit": USD, "amount": amount - 1}}
                done = send(c, f"/v1/reservations/{rid}/commit", commit)
                assert done.status_code == 200, done.text
                replay = send(c, f"/v1/reservations/{rid}/commit", commit)
                assert replay.json() == done.json()
                with lock:
                    outcomes.append({"rid": rid, "charged": done.json()["charged"]["amount"]})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    time.sleep(1.5)
    rs.kill()
    time.sleep(1.0)
    rs.start()
    time.sleep(1.5)
    stop.set()
    for th in threads:
        th.join(120)
    assert outcomes
    assert failures_seen, "the outage was not observed by any client; the test proved nothing"
    bal = t.balance("")
    assert bal["spent"]["amount"] == sum(o["charged"] for o in outcomes)
    assert bal["reserved"]["amount"] == 0
    with t.client() as c:
        for o in outcomes[:: max(1, len(outcomes) // 50)]:
            r = c.get(f"/v1/reservations/{o['rid']}").json()
            assert r["status"] == "COMMITTED" and r["committed"]["amount"] == o["charged"]


def test_tls_and_password_in_the_url(tmp_path: Path) -> None:
    """`rediss://:password@host:port/0` reaches a Redis that requires TLS and a password."""
    import shutil
    import subprocess

    from redis_support import redis_binary
    from support import free_port

    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([redis_binary(), "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                             "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                             "--requirepass", "s3cret", "--save", "", "--bind", "127.0.0.1", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        probe = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                probe.ping()
                break
            except redis.RedisError:
                time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"rediss://:wrong@127.0.0.1:{port}/0?ssl_ca_certs={cert}").ping()
        srv = start_server(url, tmp_path)
        try:
            t = new_tenant(srv)
            t.budget("", 1_000)
            with t.client() as c:
                _cycle(t, c)
            assert t.balance("")["spent"]["amount"] == 100
        finally:
            srv.stop()
    finally:
        proc.terminate()
        proc.wait(10)
