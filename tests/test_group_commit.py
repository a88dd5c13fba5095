"""Group commit on the embedded store: many operations share one write transaction, each in its own
savepoint (or, in a batch of runtime operations only, none: a failure after a write runs the batch again with
them), so an operation's error leaves the others committed and correct; an acknowledged operation survives
kill -9 in the middle of a batch."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cycles.protocol.errors import ProtocolError
from cycles.store.base import ReserveCommand, SettleCommand
from cycles.store.sqlite import SQLiteStore
from support import ADMIN_KEY, Server, cycles_bin, free_port, new_tenant

UNIT = "USD_MICROCENTS"


def reserve_cmd(tenant: str, amount: int, key: str | None = None) -> ReserveCommand:
    return ReserveCommand(tenant=tenant, endpoint="reserve", idempotency_key=key or uuid.uuid4().hex, payload_hash="h",
                          subject={"tenant": tenant}, action={"kind": "llm.completion", "name": "m"}, unit=UNIT,
                          amount=amount, scope_path=f"tenant:{tenant}", scopes=[f"tenant:{tenant}"])


async def _store_with_budget(path: Path, allocated: int) -> SQLiteStore:
    store = SQLiteStore(str(path))
    await store.create_tenant({"tenant_id": "t", "status": "ACTIVE", "name": "t", "created_at": "2026-01-01T00:00:00Z"})
    await store.create_budget({"tenant_id": "t", "scope": "tenant:t", "unit": UNIT, "allocated": allocated})
    return store


def test_errors_inside_a_batch_touch_only_their_own_operation(tmp_path: Path) -> None:
    async def main() -> None:
        store = await _store_with_budget(tmp_path / "c.db", 1_000)
        batches0 = store.batches

        def poisoned(conn: sqlite3.Connection, now: int) -> None:
            # writes, then fails: its write must be rolled back to its savepoint, nothing else
            conn.execute("UPDATE budgets SET spent = spent + 999 WHERE tenant_id='t'")
            raise RuntimeError("injected failure after a write")

        ops = []
        for i in range(40):
            if i % 10 == 3:
                ops.append(store._awrite(poisoned))
            elif i % 10 == 7:
                ops.append(store.reserve(reserve_cmd("t", 10**6)))  # BUDGET_EXCEEDED
            else:
                ops.append(store.reserve(reserve_cmd("t", 25)))
        out = await asyncio.gather(*ops, return_exceptions=True)
        assert store.batches - batches0 <= 2, "the concurrent writes were not grouped"
        ok = [o for o in out if not isinstance(o, BaseException)]
        injected = [o for o in out if isinstance(o, RuntimeError)]
        exceeded = [o for o in out if isinstance(o, ProtocolError)]
        assert len(injected) == 4 and len(exceeded) == 4 and len(ok) == 32
        assert {e.code.value for e in exceeded} == {"BUDGET_EXCEEDED"}
        rids = {o.result["reservation_id"] for o in ok}
        assert len(rids) == 32
        row = store.conn.execute("SELECT spent, reserved FROM budgets WHERE tenant_id='t'").fetchone()
        assert row == (0, 32 * 25)  # no injected spend, every successful hold counted once
        assert store.conn.execute("SELECT count(*) FROM reservations WHERE status='ACTIVE'").fetchone()[0] == 32
        # and the ledger keeps working: commits in one batch, each charged once
        settled = await asyncio.gather(*(store.commit(SettleCommand(
            tenant="t", reservation_id=rid, idempotency_key=uuid.uuid4().hex, payload_hash="c", actual=20, unit=UNIT))
            for rid in rids))
        assert all(s.result["charged"] == 20 for s in settled)
        assert store.conn.execute("SELECT spent, reserved FROM budgets WHERE tenant_id='t'").fetchone() == (640, 0)
        await store.close()

    asyncio.run(main())


def test_a_runtime_batch_without_savepoints_still_isolates_a_failure_after_a_write(tmp_path: Path) -> None:
    """Batches of runtime operations only run without savepoints; one that fails after writing makes the batch
    run again with them: its write is undone, every other operation commits once, and answers once."""
    async def main() -> None:
        store = await _store_with_budget(tmp_path / "c.db", 1_000)
        batches0 = store.batches
        savepoints: list[str] = []
        store.conn.set_trace_callback(lambda sql: savepoints.append(sql) if sql.startswith("SAVEPOINT") else None)

        def poisoned(conn: sqlite3.Connection, now: int) -> None:
            conn.execute("UPDATE budgets SET spent = spent + 999 WHERE tenant_id='t'")
            raise RuntimeError("injected failure after a write")

        plain = await asyncio.gather(*(store.reserve(reserve_cmd("t", 5)) for _ in range(8)))
        assert len(plain) == 8 and not savepoints, "a batch of runtime operations ran with savepoints"
        ops = [store._awrite(poisoned, rerun=True) if i == 5 else store.reserve(reserve_cmd("t", 25 if i != 9 else 10**6))
               for i in range(16)]
        out = await asyncio.gather(*ops, return_exceptions=True)
        assert store.batches - batches0 == 2, "both batches commit once each"
        assert savepoints, "the batch with the failure after a write did not run again with savepoints"
        assert isinstance(out[5], RuntimeError) and isinstance(out[9], ProtocolError)
        ok = [o for o in out if not isinstance(o, BaseException)]
        assert len(ok) == 14 and len({o.result["reservation_id"] for o in ok}) == 14
        row = store.conn.execute("SELECT spent, reserved FROM budgets WHERE tenant_id='t'").fetchone()
        assert row == (0, 8 * 5 + 14 * 25)
        assert store.conn.execute("SELECT count(*) FROM reservations").fetchone()[0] == 22
        await store.close()

    asyncio.run(main())


def test_same_key_twice_in_one_batch_is_one_reservation(tmp_path: Path) -> None:
    async def main() -> None:
        store = await _store_with_budget(tmp_path / "c.db", 1_000)
        key = uuid.uuid4().hex
        first, second = await asyncio.gather(store.reserve(reserve_cmd("t", 100, key)),
                                             store.reserve(reserve_cmd("t", 100, key)))
        assert not first.replay and second.replay
        assert first.result == second.result
        assert store.conn.execute("SELECT reserved FROM budgets WHERE tenant_id='t'").fetchone()[0] == 100
        await store.close()

    asyncio.run(main())


def test_oversubscription_impossible_under_grouped_concurrency(tmp_path: Path) -> None:
    async def main() -> None:
        store = await _store_with_budget(tmp_path / "c.db", 1_000)
        out = await asyncio.gather(*(store.reserve(reserve_cmd("t", 7)) for _ in range(500)), return_exceptions=True)
        ok = [o for o in out if not isinstance(o, BaseException)]
        assert len(ok) == 1_000 // 7
        assert store.conn.execute("SELECT reserved FROM budgets WHERE tenant_id='t'").fetchone()[0] == 7 * len(ok)
        await store.close()

    asyncio.run(main())


# ---- kill -9 in the middle of batches: what was acknowledged is there after a restart ----

_LOAD = r"""
import asyncio, sys, uuid, httpx
base, key, tenant, out = sys.argv[1:5]
async def client(c, f):
    while True:
        k = uuid.uuid4().hex
        body = {"idempotency_key": k, "subject": {"tenant": tenant}, "action": {"kind": "llm.completion", "name": "m"},
                "estimate": {"unit": "USD_MICROCENTS", "amount": 3}}
        try:
            r = await c.post("/v1/reservations", json=body)
        except httpx.HTTPError:
            return
        if r.status_code == 200:
            f.write(r.json()["reservation_id"] + "\n")
            f.flush()
async def main():
    with open(out, "w") as f:
        async with httpx.AsyncClient(base_url=base, headers={"X-Cycles-API-Key": key}, timeout=5) as c:
            await asyncio.gather(*(client(c, f) for _ in range(24)))
asyncio.run(main())
"""


def _serve(db: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "CYCLES_ADMIN_API_KEY": ADMIN_KEY, "CYCLES_EMBEDDED_WORKER": "0"}
    return subprocess.Popen([cycles_bin(), "serve", "--port", str(port), "--store", f"sqlite:///{db}",
                             "--log-level", "warning", "--sweep-interval-ms", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_healthy(base: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/actuator/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not start")


@pytest.mark.slow
def test_kill_9_mid_batch_loses_nothing_acknowledged(tmp_path: Path) -> None:
    db, port = tmp_path / "c.db", free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _serve(db, port)
    try:
        _wait_healthy(base)
        server = Server(base, f"sqlite:///{db}")
        tenant = new_tenant(server)
        tenant.budget(amount=10**12)
        acked = tmp_path / "acked.txt"
        load = subprocess.Popen([sys.executable, "-c", _LOAD, base, tenant.key, tenant.tenant_id, str(acked)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not acked.exists() or len(acked.read_text().split()) < 300):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the load: batches in flight
        proc.wait(10)
        load.wait(20)
        rids = acked.read_text().split()
        assert len(rids) >= 300
        proc = _serve(db, port)
        _wait_healthy(base)
        with tenant.client() as c:
            for rid in rids:
                r = c.get(f"/v1/reservations/{rid}")
                assert r.status_code == 200 and r.json()["status"] == "ACTIVE", (rid, r.text)
        # the ledger holds exactly the reservations that exist: none half-written, none counted twice
        conn = sqlite3.connect(db)
        active = conn.execute("SELECT count(*), coalesce(sum(amount), 0) FROM reservations WHERE tenant_id=? "
                              "AND status='ACTIVE'", (tenant.tenant_id,)).fetchone()
        reserved = conn.execute("SELECT reserved FROM budgets WHERE tenant_id=?", (tenant.tenant_id,)).fetchone()[0]
        conn.close()
        assert active[0] >= len(rids) and reserved == active[1] == 3 * active[0]
    finally:
        proc.kill()
        proc.wait(10)


def test_reservation_ids_are_time_ordered_and_unique(tmp_path: Path) -> None:
    async def main() -> None:
        store = await _store_with_budget(tmp_path / "c.db", 10**9)
        out = []
        for _ in range(5):
            out += await asyncio.gather(*(store.reserve(reserve_cmd("t", 1)) for _ in range(50)))
            await asyncio.sleep(0.002)
        rids = [o.result["reservation_id"] for o in out]
        assert len(set(rids)) == len(rids)
        assert rids == sorted(rids)  # successive batches sort after each other
        assert all(len(r) == 28 and r.startswith("rsv_") for r in rids)
        await store.close()

    asyncio.run(main())


def test_a_file_from_before_without_rowid_reservations_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = asyncio.run(_store_with_budget(path, 1_000))
    asyncio.run(store.close())
    # turn the file back into the earlier layout: a rowid reservations table (no idempotency columns), the
    # (status, deadline_ms) index, and a live reserve recorded in the idempotency table as it used to be
    conn = sqlite3.connect(path)
    conn.executescript("""
        DROP TABLE reservations;
        CREATE TABLE reservations (
            reservation_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, status TEXT NOT NULL,
            subject TEXT NOT NULL, action TEXT NOT NULL, unit TEXT NOT NULL, amount INTEGER NOT NULL,
            scope_path TEXT NOT NULL, affected_scopes TEXT NOT NULL, budgeted_scopes TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL, grace_ms INTEGER NOT NULL,
            deadline_ms INTEGER NOT NULL, overage_policy TEXT NOT NULL, idempotency_key TEXT,
            metadata TEXT, committed INTEGER, committed_metadata TEXT, finalized_at_ms INTEGER,
            extensions INTEGER NOT NULL DEFAULT 0, max_extensions INTEGER NOT NULL,
            s_workspace TEXT, s_app TEXT, s_workflow TEXT, s_agent TEXT, s_toolset TEXT, commit_limits TEXT);
        CREATE INDEX reservations_tenant_created ON reservations (tenant_id, created_at_ms, reservation_id);
        CREATE INDEX reservations_active_deadline ON reservations (status, deadline_ms);
        CREATE INDEX reservations_tenant_key ON reservations (tenant_id, idempotency_key);
    """)
    now = int(time.time() * 1000)
    result = ('{"scope_path":"tenant:t","affected_scopes":["tenant:t"],"unit":"USD_MICROCENTS","amount":40,'
              '"decision":"ALLOW","caps":null,"reservation_id":"rsv_old","expires_at_ms":%d,"balances":[]}' % (now + 60_000))
    conn.execute("INSERT INTO reservations VALUES ('rsv_old','t','ACTIVE','{\"tenant\":\"t\"}','{\"kind\":\"k\",\"name\":\"n\"}',"
                 "'USD_MICROCENTS',40,'tenant:t','[\"tenant:t\"]','[\"tenant:t\"]',?,?,5000,?,'ALLOW_IF_AVAILABLE',"
                 "'old-key',NULL,NULL,NULL,NULL,0,10,NULL,NULL,NULL,NULL,NULL,NULL)", (now, now + 60_000, now + 65_000))
    conn.execute("INSERT INTO idempotency VALUES ('t','reserve','old-key','h',?,'rsv_old',?)", (result, now))
    conn.execute("UPDATE budgets SET reserved=40 WHERE tenant_id='t'")
    conn.commit()
    conn.close()

    async def main() -> None:
        store = SQLiteStore(str(path))
        sql = store.conn.execute("SELECT sql FROM sqlite_master WHERE name='reservations'").fetchone()[0]
        assert "WITHOUT ROWID" in sql.upper()
        indexes = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type='index' "
                                                    "AND tbl_name='reservations'")}
        assert "reservations_active" in indexes and "reservations_active_deadline" not in indexes
        replay = await store.reserve(reserve_cmd("t", 40, "old-key"))  # recorded before the migration
        assert replay.replay and replay.result["reservation_id"] == "rsv_old"
        fresh = await store.reserve(reserve_cmd("t", 60, "new-key"))
        again = await store.reserve(reserve_cmd("t", 60, "new-key"))  # recorded on its reservation row now
        assert again.replay and again.result == fresh.result
        done = await store.commit(SettleCommand(tenant="t", reservation_id="rsv_old", idempotency_key="c",
                                                payload_hash="c", actual=30, unit=UNIT))
        assert done.result["charged"] == 30
        assert store.conn.execute("SELECT spent, reserved FROM budgets WHERE tenant_id='t'").fetchone() == (30, 60)
        assert await store.expire_due() == 0
        await store.close()

    asyncio.run(main())


def test_wal_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PASSIVE checkpoints let the log restart and be cut to WAL_KEEP_BYTES; a reader that pins the
    log makes it grow until the forced TRUNCATE checkpoint runs once the reader is gone."""
    from cycles.store.sqlite import core

    monkeypatch.setattr(core, "WAL_KEEP_BYTES", 256 << 10)
    monkeypatch.setattr(core, "WAL_TRUNCATE_BYTES", 2 << 20)
    wal = tmp_path / "w.db-wal"

    written = 0

    async def write(store: SQLiteStore, n: int, size: int = 50) -> None:
        nonlocal written
        for _ in range(n // size):
            await asyncio.gather(*(store.reserve(reserve_cmd("t", 1)) for _ in range(size)))
            written += size
            await asyncio.sleep(0.01)

    async def settle(store: SQLiteStore, limit: int) -> int:
        # the first commit after a restart cuts the file to WAL_KEEP_BYTES, or to its own size when it is larger
        # (a batch of 50 reserves sometimes is): small writes go on until one of them was that first commit
        deadline = time.monotonic() + 10
        while wal.stat().st_size > limit and time.monotonic() < deadline:
            await write(store, 5, 5)
            await asyncio.sleep(0.05)
        return wal.stat().st_size

    async def main() -> None:
        store = await _store_with_budget(tmp_path / "w.db", 10**12)
        try:
            await write(store, 1500)
            await asyncio.sleep(0.5)  # a checkpoint pass, then the next writes restart the log
            assert await settle(store, 256 << 10) <= 256 << 10
            reader = sqlite3.connect(tmp_path / "w.db")
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM reservations").fetchone()  # pins the log
            await write(store, 1500)
            pinned = wal.stat().st_size
            assert pinned > 2 << 20, pinned  # the log could not restart while the reader held it
            reader.close()
            assert await settle(store, 256 << 10) <= 256 << 10  # TRUNCATE ran once the reader was gone
            spent = sqlite3.connect(tmp_path / "w.db").execute(
                "SELECT spent + reserved FROM budgets WHERE tenant_id='t'").fetchone()[0]
            assert spent == written
        finally:
            await store.close()

    asyncio.run(main())


def test_the_log_restarts_under_continuous_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under writes that never pause, PASSIVE checkpoints never leave the log fully copied when a write
    transaction begins, so by themselves they never let it restart; the checkpointer thread finishes the copy
    with a RESTART checkpoint (_restart_log) and the log restarts (the WAL header's checkpoint sequence moves
    on each restart)."""
    import struct

    from cycles.store.sqlite import core

    monkeypatch.setattr(core, "RESTART_FRAMES", 64)
    wal = tmp_path / "r.db-wal"

    def restarts() -> int:
        with open(wal, "rb") as f:
            return struct.unpack(">I", f.read(16)[12:16])[0]

    async def main() -> None:
        store = await _store_with_budget(tmp_path / "r.db", 10**12)
        try:
            first, written = restarts(), 0
            deadline = time.monotonic() + 15
            while restarts() - first < 2 and time.monotonic() < deadline:
                await asyncio.gather(*(store.reserve(reserve_cmd("t", 1)) for _ in range(32)))
                written += 32
            assert restarts() - first >= 2, "the log never restarted under continuous writes"
            assert store.restarts >= 1
            assert store.conn.execute("SELECT reserved FROM budgets WHERE tenant_id='t'").fetchone()[0] == written
        finally:
            await store.close()

    asyncio.run(main())


_WRITER = """
import asyncio, os, sys, uuid
from cycles.store.base import ReserveCommand
from cycles.store.sqlite import SQLiteStore, core

core.RESTART_FRAMES = 256  # restart sooner than in production (4,096): a shorter test

async def main(path, stop):
    store, n = SQLiteStore(path), 0
    while not os.path.exists(stop):
        await asyncio.gather(*(store.reserve(ReserveCommand(
            tenant="t", endpoint="reserve", idempotency_key=uuid.uuid4().hex, payload_hash="h", subject={"tenant": "t"},
            action={"kind": "llm.completion", "name": "m"}, unit="USD_MICROCENTS", amount=1, scope_path="tenant:t",
            scopes=["tenant:t"])) for _ in range(32)))
        n += 32
    await store.close()
    print(n)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_the_log_restarts_while_two_processes_write(tmp_path: Path) -> None:
    """Two processes writing to one file without a pause: the log still restarts (a RESTART checkpoint takes the
    write lock for the last few frames), where it used to grow until the TRUNCATE checkpoint stalled both."""
    import struct

    path, stop, wal = tmp_path / "m.db", tmp_path / "stop", tmp_path / "m.db-wal"

    async def setup() -> None:
        await (await _store_with_budget(path, 10**12)).close()

    asyncio.run(setup())
    keep = sqlite3.connect(path)  # keeps the WAL file (and its header) between the writers' connections
    keep.execute("SELECT 1 FROM budgets").fetchall()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(stop)], env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        def seq() -> int:
            with open(wal, "rb") as f:
                head = f.read(16)
            return struct.unpack(">I", head[12:16])[0] if len(head) == 16 else 0

        deadline = time.monotonic() + 30
        while not (wal.exists() and wal.stat().st_size > 32) and time.monotonic() < deadline:
            time.sleep(0.02)
        first = seq()
        while seq() - first < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        restarted = seq() - first
    finally:
        stop.touch()
        written = sum(int(w.communicate(timeout=30)[0]) for w in writers)
        keep.close()
    assert restarted >= 2, "the log never restarted while two processes wrote"
    total = sqlite3.connect(path).execute("SELECT reserved FROM budgets WHERE tenant_id='t'").fetchone()[0]
    assert total == written
