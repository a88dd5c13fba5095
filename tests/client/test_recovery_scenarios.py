"""cycles-sdk-recovery profile 0.3: one native test per scenario id of scenarios.yaml (docs/sdk.md has
the mapping). Everything runs against the real server; faults are injected by a transport in front of
it; restart and concurrent-replay scenarios run the SDK in separate OS processes (recovery_child.py)
so only the journal directory crosses the boundary."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cycles.client import CyclesClient, cycles, get_cycles_context
from cycles.client.journal import Journal, PendingRecord, legacy_filename, record_filename
from faults import Script

CHILD = Path(__file__).resolve().parent / "recovery_child.py"
ERR429 = {"error": "LIMIT_EXCEEDED", "message": "slow down", "request_id": "req_x"}


def spent(tenant) -> int:
    return tenant.balance()["spent"]["amount"]


def reserved(tenant) -> int:
    return tenant.balance()["reserved"]["amount"]


def records(journal_dir: Path) -> list[Path]:
    return sorted(journal_dir.rglob("v2-*.json"))


def run_child(params: dict, *, expect_rc: int = 0, timeout: float = 60) -> dict:
    proc = subprocess.run([sys.executable, str(CHILD), json.dumps(params)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == expect_rc, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {}
    out["_stderr"] = proc.stderr
    return out


def child_params(tenant, journal_dir, **kw) -> dict:
    return {"base_url": tenant.server.base_url, "api_key": tenant.key, "tenant": tenant.tenant_id,
            "journal_dir": str(journal_dir), **kw}


def reservation(tenant, rid):
    with tenant.client() as c:
        return c.get(f"/v1/reservations/{rid}").json()


def reserve_raw(tenant, amount=1000, ttl_ms=60_000, grace=None):
    body = {"idempotency_key": uuid.uuid4().hex, "subject": {"tenant": tenant.tenant_id},
            "action": {"kind": "llm", "name": "raw"}, "estimate": {"unit": "USD_MICROCENTS", "amount": amount},
            "ttl_ms": ttl_ms}
    if grace is not None:
        body["grace_period_ms"] = grace
    with tenant.client() as c:
        r = c.post("/v1/reservations", json=body)
    assert r.status_code == 200, r.text
    return r.json()["reservation_id"]


def journal_record(tenant, journal_dir, rid, amount, key) -> PendingRecord:
    """What a previous process left behind: the standard record file for a commit it could not settle."""
    from cycles.client import recovery
    from cycles.protocol import models as m

    rec = recovery.build_record(tenant.server.base_url, rid,
                                m.CommitRequest(idempotency_key=key, actual=m.Amount(unit="USD_MICROCENTS",
                                                                                     amount=amount)),
                                m.Subject(tenant=tenant.tenant_id), m.Action(kind="llm", name="raw"))
    j = Journal(journal_dir, tenant.server.base_url, tenant.key, tenant.tenant_id)
    assert j.persist(rec)
    return rec


# ------------------------------------------------------------------------------------------ core


def test_CR_CORE_001_lost_commit_response_reuses_key(tenant, client, script, journal_dir):
    tenant.budget(amount=1_000_000)
    script.rules.append(("commit", "lose_response"))

    @cycles(5000, actual=1200, client=client, idempotency_key="cr-core-001")
    def work():
        return "done"

    assert work() == "done"
    assert client.flush(10)
    commits = script.of("commit")
    assert [c.key for c in commits] == ["commit-cr-core-001", "commit-cr-core-001"]
    assert commits[0].body == commits[1].body
    assert commits[0].status == 200 and commits[1].status == 200  # the replay got the original answer
    assert spent(tenant) == 1200 and reserved(tenant) == 0  # settled at most once
    assert records(journal_dir) == []


def test_CR_CORE_002_expired_commit_falls_back_to_event(tenant, make_client, journal_dir):
    tenant.budget(amount=1_000_000)
    s = Script()
    c = make_client(s, heartbeat_enabled=False)

    @cycles(5000, actual=800, client=c, ttl_ms=1000, grace_period_ms=0, idempotency_key="cr-core-002",
            action_kind="llm.completion", action_name="gpt-x", workspace="ws", metadata={"job": "j2"})
    def work():
        get_cycles_context().metrics.tokens_output = 7
        time.sleep(1.5)  # the lease expires while the work runs
        return 1

    work()
    assert s.ops() == ["create", "commit", "event"]
    commit, event = s.of("commit")[0], s.of("event")[0]
    assert commit.status == 410 and event.status == 201
    assert event.key == commit.key == "commit-cr-core-002"
    create = s.of("create")[0].body
    assert event.body["subject"] == create["subject"] and event.body["action"] == create["action"]
    assert event.body["actual"] == {"unit": "USD_MICROCENTS", "amount": 800}
    assert event.body["metrics"]["tokens_output"] == 7
    assert event.body["metadata"]["recovered_reservation_id"] == commit.path.split("/")[3]
    assert event.body["metadata"]["job"] == "j2"
    assert spent(tenant) == 800 and reserved(tenant) == 0  # charged once, the hold is gone
    assert records(journal_dir) == []


def test_CR_CORE_003_heartbeat_transport_failure_is_observable_and_non_fatal(tenant, make_client, caplog):
    tenant.budget(amount=1_000_000)
    s = Script([("extend", "connect_error")])
    c = make_client(s, connect_timeout=0.2, read_timeout=0.3, write_timeout=0.2)
    events = []

    @cycles(100, actual=90, client=c, ttl_ms=4000, on_heartbeat_event=events.append)
    def work():
        # until the failed extend and its retry answered (about 2 s in), not a fixed sleep: on a loaded
        # machine the heartbeat thread may run late; the next extend would come ~4 s after the retry
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            extends = s.of("extend")
            if len(extends) >= 2 and extends[1].status is not None and events:
                break
            time.sleep(0.05)
        return get_cycles_context()

    with caplog.at_level(logging.WARNING, logger="cycles.client"):
        ctx = work()
    assert s.ops_once() == ["create", "extend", "extend", "commit"]
    e1, e2 = s.of("extend")
    assert e1.key == e2.key and e1.fault == "connect_error" and e2.status == 200
    assert len(events) == 1 and events[0].reservation_id == ctx.reservation_id
    assert events[0].disposition.startswith("retry same key")
    assert ctx.heartbeat_events == events
    assert any(ctx.reservation_id in r.getMessage() and "disposition" in r.getMessage() for r in caplog.records)
    assert spent(tenant) == 90  # the action continued and the final settlement happened


@pytest.mark.parametrize("bad", [(201, None), (200, b'{"status":"COMMITTED"}'), (200, b"<html>oops</html>")])
def test_CR_CORE_004_protocol_invalid_success_remains_ambiguous(tenant, make_client, journal_dir, bad):
    tenant.budget(amount=1_000_000)
    status, body = bad
    # `after`: the commit really reaches the server; the client sees a non-conformant answer.
    s = Script([("commit", "after", (status, body if body is not None else
                                     {"status": "COMMITTED", "charged": {"unit": "USD_MICROCENTS", "amount": 3}}))])
    c = make_client(s)

    @cycles(500, actual=300, client=c, idempotency_key=f"cr-core-004-{status}-{len(body or b'')}")
    def work():
        return 1

    work()
    first = c.settler  # the first attempt was not terminal: a record exists until the retry succeeds
    assert first is not None
    assert c.flush(10)
    commits = s.of("commit")
    assert len(commits) == 2 and commits[0].key == commits[1].key and commits[0].body == commits[1].body
    assert spent(tenant) == 300
    assert records(journal_dir) == []


# ------------------------------------------------------------------------------------------ durable


def test_CR_DURABLE_001_first_commit_journaled_before_it_leaves(tenant, journal_dir, tmp_path):
    tenant.budget(amount=1_000_000)
    snap = tmp_path / "snapshot.json"
    run_child(child_params(tenant, journal_dir, mode="guarded", estimate=5000, actual=2100, key="cr-dur-001",
                           rules=[["commit", "die_after", 137]], snapshot_to=str(snap)), expect_rc=137)
    # At the moment the commit left the process, the intent was already in the journal.
    seen = json.loads(snap.read_text())
    wal = [v for k, v in seen["files"].items() if Path(k).name.startswith("wal-")]
    assert seen["op"] == "commit" and len(wal) == 1 and '"commit-cr-dur-001"' in wal[0]
    assert spent(tenant) == 2100  # the commit did reach the server before the process died
    # Restart: a fresh process adopts the dead process's intent log and replays with the same key.
    out = run_child(child_params(tenant, journal_dir, mode="replay"))
    assert [(s["op"], s["key"], s["status"]) for s in out["seen"]] == [("commit", "commit-cr-dur-001", 200)]
    assert len(out["settled"]) == 1 and out["unresolved"] == []
    assert records(journal_dir) == [] and list(journal_dir.rglob("wal-*.log")) == []
    assert spent(tenant) == 2100 and reserved(tenant) == 0  # at most once


def test_CR_DURABLE_002_expired_replay_switches_to_event_durably(tenant, journal_dir):
    tenant.budget(amount=1_000_000)
    rid = reserve_raw(tenant, 3000, ttl_ms=1000, grace=0)
    rec = journal_record(tenant, journal_dir, rid, 1700, "cr-dur-002-commit")
    time.sleep(1.4)  # the reservation expires
    out = run_child(child_params(tenant, journal_dir, mode="replay", rules=[["event", "die_before", 137]]),
                    expect_rc=137)
    (path,) = records(journal_dir)
    stored = json.loads(path.read_text())
    assert stored["mode"] == "event"  # persisted before the event attempt (the process died before sending)
    assert stored["event_fallback_body"]["idempotency_key"] == "cr-dur-002-commit"
    assert spent(tenant) == 0
    out = run_child(child_params(tenant, journal_dir, mode="replay"))
    assert [(s["op"], s["key"], s["status"]) for s in out["seen"]] == [("event", "cr-dur-002-commit", 201)]
    assert out["settled"] == [[rid, "event"]]
    assert records(journal_dir) == []
    assert spent(tenant) == 1700 and reserved(tenant) == 0
    assert rec.reservation_id == rid


def test_CR_DURABLE_003_rate_limit_floor_survives_restart(tenant, journal_dir):
    tenant.budget(amount=1_000_000)
    before = int(time.time() * 1000)
    run_child(child_params(tenant, journal_dir, mode="guarded", estimate=900, actual=450, key="cr-dur-003",
                           exit_now=True,
                           rules=[["commit", "status", [429, ERR429, {"Retry-After": "2",
                                                                      "content-type": "application/json"}]]]))
    (path,) = records(journal_dir)
    nb = json.loads(path.read_text())["not_before_ms"]
    assert nb >= before + 2000
    out = run_child(child_params(tenant, journal_dir, mode="replay"))  # restarted before Retry-After elapsed
    (commit_time,) = [t for op, t in out["times"] if op == "commit"]
    assert commit_time >= nb  # no retry before the persisted not-before
    assert [(s["op"], s["key"], s["status"]) for s in out["seen"]] == [("commit", "commit-cr-dur-003", 200)]
    assert records(journal_dir) == [] and spent(tenant) == 450


def test_CR_DURABLE_004_tenant_journal_survives_key_rotation(tenant, journal_dir):
    tenant.budget(amount=1_000_000)
    rid = reserve_raw(tenant, 1000)
    journal_record(tenant, journal_dir, rid, 600, "cr-dur-004")
    with tenant.server.admin() as a:
        r = a.post("/v1/admin/api-keys", json={"tenant_id": tenant.tenant_id, "name": "rotated",
                                                "permissions": ["reservations:create", "reservations:commit",
                                                                "reservations:release", "reservations:extend",
                                                                "reservations:list", "balances:read"]})
        assert r.status_code == 201
        new_key = r.json()["key_secret"]
    out = run_child(child_params(tenant, journal_dir, mode="replay", api_key=new_key))
    assert [(s["op"], s["key"], s["status"]) for s in out["seen"]] == [("commit", "cr-dur-004", 200)]
    assert spent(tenant) == 600 and records(journal_dir) == []
    for f in journal_dir.rglob("*"):
        if f.is_file():
            assert tenant.key not in f.read_text(errors="replace")
    assert tenant.key not in " ".join(str(p) for p in journal_dir.rglob("*"))


def test_CR_DURABLE_005_corrupt_and_unsupported_records_quarantined(tenant, journal_dir):
    tenant.budget(amount=1_000_000)
    rid = reserve_raw(tenant, 1000)
    journal_record(tenant, journal_dir, rid, 250, "cr-dur-005")
    part = records(journal_dir)[0].parent
    (part / record_filename("corrupt-id")).write_text('{"version": 1, "reservation_id": ')
    bad_version = PendingRecord("future-id", tenant.server.base_url, commit_body={"x": 1}).to_dict()
    bad_version["version"] = 99
    (part / record_filename("future-id")).write_text(json.dumps(bad_version))
    out = run_child(child_params(tenant, journal_dir, mode="replay"))
    assert sorted(Path(q).name for q in out["quarantined"]) == sorted(
        [record_filename("corrupt-id").replace(".json", ".corrupt"),
         record_filename("future-id").replace(".json", ".corrupt")])
    assert all(Path(q).exists() for q in out["quarantined"])
    assert out["settled"] == [[rid, "commit"]] and spent(tenant) == 250  # the valid record still replays
    assert "quarantined corrupt commit-journal record" in out["_stderr"]
    assert "unsupported journal record version" in out["_stderr"]
    assert records(journal_dir) == []


def test_CR_DURABLE_006_concurrent_replay_is_exactly_once(tenant, journal_dir):
    tenant.budget(amount=1_000_000)
    rid = reserve_raw(tenant, 1000)
    journal_record(tenant, journal_dir, rid, 333, "cr-dur-006")
    barrier = journal_dir.parent / "barrier-006"
    barrier.mkdir()
    params = json.dumps(child_params(tenant, journal_dir, mode="replay", barrier=[str(barrier), 2]))
    procs = [subprocess.Popen([sys.executable, str(CHILD), params], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    commits = [s for o in outs for s in o["seen"] if s["op"] == "commit"]
    assert len(commits) == 2 and {c["key"] for c in commits} == {"cr-dur-006"}  # both workers sent it
    assert all(c["status"] == 200 for c in commits)
    assert spent(tenant) == 333  # settled once
    assert records(journal_dir) == []


def test_CR_DURABLE_007_filenames_and_legacy_migration(tmp_path):
    j = Journal(tmp_path, "http://server", "key", "acme")
    rid_a, rid_b = "res/1", "res_1"  # both map to the legacy name res_1.json
    assert legacy_filename(rid_a) == legacy_filename(rid_b)
    assert record_filename("résa-1") == "v2-" + hashlib.sha256("résa-1".encode("utf-8")).hexdigest() + ".json"
    assert record_filename(rid_a) != record_filename(rid_b)
    j.dir.mkdir(parents=True)
    legacy = j.dir / legacy_filename(rid_a)
    legacy.write_text(json.dumps(PendingRecord(rid_a, "http://server", commit_body={"k": 1}).to_dict()))
    j.persist(PendingRecord(rid_b, "http://server", commit_body={"k": 2}))
    j.discard(rid_b)  # never deletes a legacy file that belongs to another identifier
    assert legacy.exists()
    j.persist(PendingRecord(rid_b, "http://server", commit_body={"k": 2}))
    report = j.scan()
    assert sorted(r.reservation_id for r in report.records) == [rid_a, rid_b]
    assert not legacy.exists() and (j.dir / record_filename(rid_a)).exists()  # migrated
    assert (j.dir / record_filename(rid_b)).exists()  # the colliding record is untouched
    assert report.migrated == 1


# ------------------------------------------------------------------------------------------ boundary


def test_CR_BOUNDARY_001_missing_actual_is_surfaced_without_settlement(tenant, client, script, journal_dir):
    tenant.budget(amount=1_000_000)

    @cycles(400, client=client)
    def work():
        raise TimeoutError("the provider never answered: actual unknown")

    with pytest.raises(TimeoutError):
        work()
    assert "commit" not in script.ops() and "event" not in script.ops()
    assert records(journal_dir) == [] and spent(tenant) == 0
