"""The embedded store keeps budgets, reservations and idempotency records across restarts."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from support import USD, free_port, cycles_bin, new_tenant, reserve_body, start_server


@pytest.fixture
def sqlite_only(store_kind: str) -> None:
    if store_kind != "sqlite":
        pytest.skip("embedded-store behaviour")


def test_restart_keeps_everything(tmp_path: Path, sqlite_only: None) -> None:
    url = f"sqlite:///{tmp_path / 'cycles.db'}"
    srv = start_server(url, tmp_path)
    t = new_tenant(srv)
    t.budget("", 10_000)
    create = reserve_body(t, 1_000, key="create-1", ttl_ms=600_000)
    with t.client() as c:
        first = c.post("/v1/reservations", json=create)
        committed = c.post("/v1/reservations", json=reserve_body(t, 2_000)).json()["reservation_id"]
        c.post(f"/v1/reservations/{committed}/commit",
               json={"idempotency_key": "commit-1", "actual": {"unit": USD, "amount": 1_500}})
    before = t.balance("")
    srv.stop()

    srv = start_server(url, tmp_path, port=int(srv.base_url.rsplit(":", 1)[1]))
    try:
        assert t.balance("") == before
        with t.client() as c:
            replay = c.post("/v1/reservations", json=create)
            assert replay.json()["reservation_id"] == first.json()["reservation_id"]
            again = c.post(f"/v1/reservations/{committed}/commit",
                           json={"idempotency_key": "commit-1", "actual": {"unit": USD, "amount": 1_500}})
            assert again.status_code == 200 and again.json()["charged"]["amount"] == 1_500
            rid = first.json()["reservation_id"]
            assert c.get(f"/v1/reservations/{rid}").json()["status"] == "ACTIVE"
            done = c.post(f"/v1/reservations/{rid}/commit",
                          json={"idempotency_key": "commit-2", "actual": {"unit": USD, "amount": 1_000}})
            assert done.status_code == 200
        after = t.balance("")
        assert after["spent"]["amount"] == 2_500 and after["reserved"]["amount"] == 0
    finally:
        srv.stop()


def test_health_down_when_store_file_goes_away(tmp_path: Path, sqlite_only: None) -> None:
    data = tmp_path / "data"
    url = f"sqlite:///{data / 'cycles.db'}"
    srv = start_server(url, tmp_path)
    try:
        t = new_tenant(srv)
        t.budget("", 10_000)
        os.rename(data / "cycles.db", tmp_path / "aside.db")
        r = httpx.get(srv.base_url + "/actuator/health")
        assert r.status_code == 503 and r.json() == {"status": "DOWN"}
        with t.client() as c:
            r = c.post("/v1/reservations", json=reserve_body(t, 100))
        assert r.status_code == 503
        assert r.json()["error"] == "INTERNAL_ERROR" and r.headers["retry-after"] == "1"
        assert set(r.json()) == {"error", "message", "request_id", "trace_id"}
        assert httpx.get(srv.base_url + "/actuator/health/liveness").status_code == 200
        os.rename(tmp_path / "aside.db", data / "cycles.db")
        assert httpx.get(srv.base_url + "/actuator/health").json() == {"status": "UP"}
        with t.client() as c:
            assert c.post("/v1/reservations", json=reserve_body(t, 100)).status_code == 200
    finally:
        srv.stop()


def test_generated_admin_key_is_printed_once_and_persists(tmp_path: Path, sqlite_only: None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CYCLES_ADMIN_API_KEY"}
    url = f"sqlite:///{tmp_path / 'cycles.db'}"

    def run() -> tuple[str, str]:
        port = free_port()
        proc = subprocess.Popen([cycles_bin(), "serve", "--port", str(port), "--store", url],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/actuator/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        return base, _stop(proc)

    def _stop(proc: subprocess.Popen) -> str:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
        return out

    base, first_out = run()
    keys = [line.strip() for line in first_out.splitlines() if line.strip().startswith("cyc_admin_")]
    assert len(keys) == 1, first_out
    key = keys[0]
    assert "stored hashed" in first_out

    port = free_port()
    proc = subprocess.Popen([cycles_bin(), "serve", "--port", str(port), "--store", url],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/actuator/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        ok = httpx.post(base + "/v1/admin/tenants", headers={"X-Admin-API-Key": key},
                        json={"tenant_id": "boot-tenant", "name": "b"})
        assert ok.status_code == 201
        bad = httpx.post(base + "/v1/admin/tenants", headers={"X-Admin-API-Key": key + "x"},
                         json={"tenant_id": "boot-tenant2", "name": "b"})
        assert bad.status_code == 401 and bad.json()["error"] == "UNAUTHORIZED"
    finally:
        second_out = _stop(proc)
    assert "cyc_admin_" not in second_out
    assert key not in (tmp_path / "cycles.db").read_bytes().decode("latin-1")
