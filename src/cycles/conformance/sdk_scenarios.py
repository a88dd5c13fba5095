"""The client-recovery scenarios (client-recovery/scenarios.yaml, profile 0.3) run against our Python SDK.

Each scenario function drives the SDK through the fault proxy against a real server and checks the
catalog's expected choreography and assertions on what it observes: the requests that reached the proxy,
the server's balances, the journal directory. It returns the problems it saw (none = passed). Restart and
concurrent-replay scenarios run the SDK as separate OS processes (sdk_child), so only the journal crosses."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

from .faultproxy import FaultProxy

UNIT = "USD_MICROCENTS"
ERR429 = {"error": "LIMIT_EXCEEDED", "message": "slow down", "request_id": "req_conformance"}
SCENARIOS: dict[str, Callable[["Env"], list[str]]] = {}


def scenario(sid: str):
    def wrap(fn: Callable[["Env"], list[str]]) -> Callable[["Env"], list[str]]:
        SCENARIOS[sid] = fn
        return fn
    return wrap


@dataclass
class Env:
    """One scenario's world: a fresh tenant with a budget on the real server, the proxy, a journal dir."""

    server: str
    admin_key: str
    proxy: FaultProxy
    journal: Path
    tenant: str = ""
    key: str = ""

    def setup(self) -> "Env":
        self.tenant = f"sdk-{uuid.uuid4().hex[:10]}"
        with httpx.Client(base_url=self.server, headers={"X-Admin-API-Key": self.admin_key}, timeout=30) as c:
            _ok(c.post("/v1/admin/tenants", json={"tenant_id": self.tenant, "name": self.tenant}), 200, 201)
            self.key = self.new_key()
            _ok(c.post("/v1/admin/budgets", json={"tenant_id": self.tenant, "scope": f"tenant:{self.tenant}",
                                                  "unit": UNIT, "allocated": {"unit": UNIT, "amount": 1_000_000}}),
                201)
        self.proxy.reset(journal_dir=self.journal)
        return self

    def new_key(self) -> str:
        with httpx.Client(base_url=self.server, headers={"X-Admin-API-Key": self.admin_key}, timeout=30) as c:
            r = _ok(c.post("/v1/admin/api-keys", json={
                "tenant_id": self.tenant, "name": "sdk-conformance",
                "permissions": ["reservations:create", "reservations:commit", "reservations:release",
                                "reservations:extend", "reservations:list", "balances:read"]}), 201)
        return r.json()["key_secret"]

    def config(self, **kw: Any):
        from cycles.client import CyclesConfig

        base = dict(base_url=self.proxy.url, api_key=self.key, tenant=self.tenant, journal_dir=str(self.journal),
                    retry_initial_delay=0.05, retry_max_delay=0.2, retry_flush_timeout=5.0, read_timeout=5.0)
        base.update(kw)
        return CyclesConfig(**base)

    def balance(self) -> dict[str, int]:
        with httpx.Client(base_url=self.server, headers={"X-Cycles-API-Key": self.key}, timeout=30) as c:
            r = _ok(c.get("/v1/balances", params={"tenant": self.tenant}), 200)
        b = next(x for x in r.json()["balances"] if x["scope"] == f"tenant:{self.tenant}")
        return {k: b[k]["amount"] for k in ("spent", "reserved")}

    def settled_to(self, spent: int, wait: float = 5.0) -> bool:
        """spent == `spent` and nothing held (waits for the server's sweeper to return expired holds)."""
        deadline = time.monotonic() + wait
        while True:
            b = self.balance()
            if (b["spent"] == spent and b["reserved"] == 0) or time.monotonic() > deadline:
                return b["spent"] == spent and b["reserved"] == 0
            time.sleep(0.1)

    def records(self) -> list[Path]:
        return sorted(self.journal.rglob("v2-*.json"))

    def reserve_raw(self, amount: int, ttl_ms: int = 60_000, grace: int | None = None) -> str:
        body: dict[str, Any] = {"idempotency_key": uuid.uuid4().hex, "subject": {"tenant": self.tenant},
                                "action": {"kind": "llm", "name": "raw"}, "estimate": {"unit": UNIT, "amount": amount},
                                "ttl_ms": ttl_ms}
        if grace is not None:
            body["grace_period_ms"] = grace
        with httpx.Client(base_url=self.server, headers={"X-Cycles-API-Key": self.key}, timeout=30) as c:
            return _ok(c.post("/v1/reservations", json=body), 200).json()["reservation_id"]

    def journal_commit(self, rid: str, amount: int, key: str) -> None:
        """What an earlier process left behind: the journal record of a commit it could not settle."""
        from cycles.client import recovery
        from cycles.client.journal import Journal
        from cycles.protocol import models as m

        rec = recovery.build_record(self.proxy.url, rid, m.CommitRequest(idempotency_key=key,
                                                                         actual=m.Amount(unit=UNIT, amount=amount)),
                                    m.Subject(tenant=self.tenant), m.Action(kind="llm", name="raw"))
        if not Journal(self.journal, self.proxy.url, self.key, self.tenant).persist(rec):
            raise RuntimeError("could not write the journal record")

    def child(self, mode: str, *, rules: list | None = None, api_key: str | None = None, expect_kill: bool = False,
              **params: Any) -> tuple[dict[str, Any], str]:
        """Run one SDK process through the proxy; `rules` are the faults its requests meet."""
        args = {"base_url": self.proxy.url, "api_key": api_key or self.key, "tenant": self.tenant,
                "journal_dir": str(self.journal), "mode": mode, **params}
        procs: list[subprocess.Popen] = []
        self.proxy.reset(rules or [], self.journal, killer=lambda: procs[0].kill())  # armed before it can send
        proc = subprocess.Popen([sys.executable, "-m", "cycles.conformance.sdk_child", json.dumps(args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        stdout, stderr = proc.communicate(timeout=60)
        if expect_kill:
            return {"rc": proc.returncode}, stderr
        if proc.returncode != 0:
            raise RuntimeError(f"SDK process exited {proc.returncode}: {stderr[-500:]}")
        return json.loads(stdout.strip().splitlines()[-1]), stderr


def _ok(r: httpx.Response, *status: int) -> httpx.Response:
    if r.status_code not in status:
        raise RuntimeError(f"{r.request.method} {r.request.url.path} answered {r.status_code}: {r.text[:300]}")
    return r


def _same_key(seen: list, at_least: int, what: str) -> list[str]:
    """At least `at_least` requests, all with one idempotency key and one body. More same-key attempts are
    allowed: a slow machine can time out a retry too, and a same-key retry is what the profile asks for."""
    if len(seen) < at_least:
        return [f"expected {at_least} {what} request(s) or more, saw {len(seen)}"]
    if len({s.key for s in seen}) != 1:
        return [f"{what} retries used different idempotency keys: {[s.key for s in seen]}"]
    if any(s.body != seen[0].body for s in seen):
        return [f"{what} retries changed the request body"]
    return []


def _check(problems: list[str], cond: bool, label: str) -> None:
    if not cond:
        problems.append(label)


# ------------------------------------------------------------------------------------------------ core


@scenario("CR-CORE-001")
def lost_commit_response(env: Env) -> list[str]:
    from cycles.client import CyclesClient, cycles

    env.proxy.reset([("commit", "hold", 2.5)], env.journal)
    with CyclesClient(env.config(read_timeout=1.5)) as c:
        @cycles(5000, actual=1200, client=c, idempotency_key=f"cr-core-001-{uuid.uuid4().hex[:6]}")
        def work() -> str:
            return "done"

        work()
        c.flush(10)
    p = _same_key(env.proxy.of("commit"), 2, "commit")
    _check(p, env.settled_to(1200), "settlement_occurs_at_most_once: spent != actual or a hold remains")
    _check(p, not env.records(), "the journal record was not removed after the replay succeeded")
    return p


@scenario("CR-CORE-002")
def expired_commit_to_event(env: Env) -> list[str]:
    from cycles.client import CyclesClient, cycles

    with CyclesClient(env.config(heartbeat_enabled=False)) as c:
        @cycles(5000, actual=800, client=c, ttl_ms=1000, grace_period_ms=0, action_kind="llm.completion",
                action_name="gpt-x", idempotency_key=f"cr-core-002-{uuid.uuid4().hex[:6]}")
        def work() -> int:
            time.sleep(1.5)  # the lease expires while the action runs
            return 1

        work()
        c.flush(10)
    p: list[str] = []
    creates = env.proxy.of("create")  # a create that timed out on a slow machine is replayed with its key
    settles = [s for s in env.proxy.seen if s.op != "create"]
    _check(p, [s.op for s in settles] == ["commit", "event"] and len({c.key for c in creates}) == 1,
           f"requests were {env.proxy.ops()}, expected create, commit, event")
    if not p:
        create, (commit, event) = creates[0], settles
        _check(p, commit.status == 410 and event.status == 201, "commit did not meet 410 or the event was not 201")
        _check(p, event.key == commit.key, "the event did not reuse the commit's idempotency key")
        _check(p, event.body["subject"] == create.body["subject"] and event.body["action"] == create.body["action"]
               and event.body["actual"] == {"unit": UNIT, "amount": 800},
               "event_carries_original_subject_action_actual")
    _check(p, env.settled_to(800), "settlement_occurs_at_most_once: spent != 800 or the hold remained")
    return p


@scenario("CR-CORE-003")
def heartbeat_failure(env: Env) -> list[str]:
    from cycles.client import CyclesClient, cycles, get_cycles_context

    env.proxy.reset([("extend", "drop", 0.6)], env.journal)
    events: list = []
    logs: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logs.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("cycles.client")
    logger.addHandler(handler)
    try:
        with CyclesClient(env.config(connect_timeout=0.2, read_timeout=0.3, write_timeout=0.2)) as c:
            @cycles(100, actual=90, client=c, ttl_ms=4000, on_heartbeat_event=events.append)
            def work():
                time.sleep(2.8)
                return get_cycles_context().reservation_id

            rid = work()
            c.flush(10)
    finally:
        logger.removeHandler(handler)
    extends = env.proxy.of("extend")
    p = _same_key(extends[:2], 2, "extend")
    _check(p, bool(extends) and extends[0].fault == "drop", "the first extend did not meet the injected failure")
    _check(p, env.proxy.ops()[-1] == "commit", "final_settlement_is_attempted: the last request was not a commit")
    _check(p, bool(events) and events[0].reservation_id == rid and bool(events[0].disposition),
           "heartbeat_failure_reports_reservation_and_disposition (observable event)")
    _check(p, any(rid in m and "disposition" in m for m in logs), "the heartbeat failure was not logged with the "
           "reservation id and disposition")
    _check(p, env.settled_to(90), "guarded_action_continues_under_warn_policy: the actual was not settled")
    return p


@scenario("CR-CORE-004")
def invalid_success(env: Env) -> list[str]:
    from cycles.client import CyclesClient, cycles

    p: list[str] = []
    spent = 0
    for answer in ([201, {"status": "COMMITTED", "charged": {"unit": UNIT, "amount": 3}}],
                   [200, {"status": "COMMITTED"}], [200, "<html>oops</html>"]):
        env.proxy.reset([("commit", "after", answer)], env.journal)
        with CyclesClient(env.config()) as c:
            @cycles(500, actual=300, client=c, idempotency_key=f"cr-core-004-{uuid.uuid4().hex[:6]}")
            def work() -> int:
                return 1

            work()
            c.flush(10)
        spent += 300
        p += [f"after a {answer[0]} {str(answer[1])[:30]}: {x}" for x in _same_key(env.proxy.of("commit"), 2, "commit")]
        _check(p, env.settled_to(spent), f"after {answer}: settled more or less than once")
    _check(p, not env.records(), "a record remained after schema-valid success")
    return p


# ------------------------------------------------------------------------------------------------ durable


@scenario("CR-DURABLE-001")
def journaled_before_first_commit(env: Env) -> list[str]:
    out, _ = env.child("guarded", rules=[("commit", "kill")], estimate=5000, actual=2100, key="cr-dur-001",
                       expect_kill=True)
    p: list[str] = []
    first = env.proxy.of("commit")
    _check(p, out["rc"] != 0 and len(first) == 1, "the SDK process was not terminated with its commit in flight")
    _check(p, bool(first) and any('"commit-cr-dur-001"' in text or "cr-dur-001" in text
                                  for text in (first[0].journal or {}).values()),
           "journal_write_precedes_first_settlement_request: no journal entry when the commit arrived")
    out, _ = env.child("replay")
    again = env.proxy.of("commit")
    p += _same_key(again, 1, "commit after restart")
    _check(p, bool(again) and bool(first) and again[0].key == first[0].key,
           "the replay after restart did not reuse the first commit's key")
    _check(p, bool(again) and again[-1].status == 200, "the replayed commit did not end with 200")
    _check(p, len(out["settled"]) == 1 and not out["unresolved"], "unresolved_record_survives_restart")
    _check(p, not env.records(), "successful_replay_removes_record")
    _check(p, env.settled_to(2100), "settlement_occurs_at_most_once")
    return p


@scenario("CR-DURABLE-002")
def expired_replay_to_event(env: Env) -> list[str]:
    rid = env.reserve_raw(3000, ttl_ms=1000, grace=0)
    env.journal_commit(rid, 1700, "cr-dur-002-commit")
    time.sleep(1.4)
    env.child("replay", rules=[("event", "kill_first")], expect_kill=True)
    p: list[str] = []
    recs = env.records()
    stored = json.loads(recs[0].read_text()) if len(recs) == 1 else {}
    _check(p, stored.get("mode") == "event", "event_mode_is_persisted_before_event_attempt")
    _check(p, [s.op for s in env.proxy.seen] == ["commit", "event"], f"requests were {env.proxy.ops()}")
    out, _ = env.child("replay")
    seen = [(s.op, s.key, s.status) for s in env.proxy.seen]
    _check(p, bool(seen) and {x[:2] for x in seen} == {("event", "cr-dur-002-commit")} and seen[-1][2] == 201,
           f"after restart: {seen}, expected events with the commit's key ending in 201")
    _check(p, out["settled"] == [[rid, "event"]] and not env.records(), "successful_event_removes_record")
    _check(p, env.settled_to(1700), "settlement_occurs_at_most_once")
    return p


@scenario("CR-DURABLE-003")
def rate_limit_floor(env: Env) -> list[str]:
    before = int(time.time() * 1000)
    headers = {"Retry-After": "2", "content-type": "application/json"}
    env.child("guarded", rules=[("commit", "status", [429, ERR429, headers])], estimate=900, actual=450,
              key="cr-dur-003", exit_now=True)
    p: list[str] = []
    recs = env.records()
    nb = json.loads(recs[0].read_text()).get("not_before_ms", 0) if len(recs) == 1 else 0
    _check(p, nb >= before + 2000, f"the persisted not-before ({nb}) is not Retry-After after the 429")
    env.child("replay")
    commits = env.proxy.of("commit")
    _check(p, bool(commits) and {c.key for c in commits} == {"commit-cr-dur-003"} and commits[-1].status == 200,
           f"after restart: {[(c.key, c.status) for c in commits]}")
    _check(p, bool(commits) and commits[0].at_ms >= nb, "no_retry_before_persisted_not_before")
    _check(p, not env.records() and env.settled_to(450), "successful_replay_removes_record")
    return p


@scenario("CR-DURABLE-004")
def key_rotation(env: Env) -> list[str]:
    rid = env.reserve_raw(1000)
    env.journal_commit(rid, 600, "cr-dur-004")
    old = env.key
    new = env.new_key()
    env.child("replay", api_key=new)
    p: list[str] = []
    seen = [(s.op, s.key, s.status) for s in env.proxy.seen]
    _check(p, bool(seen) and {x[:2] for x in seen} == {("commit", "cr-dur-004")} and seen[-1][2] == 200,
           f"new_tenant_credential_finds_record: saw {seen}")
    _check(p, env.settled_to(600) and not env.records(), "the record was not settled once and removed")
    stored = " ".join(f.read_text(errors="replace") + str(f) for f in env.journal.rglob("*") if f.is_file())
    _check(p, old not in stored and old not in " ".join(str(f) for f in env.journal.rglob("*")),
           "old_api_key_is_not_stored")
    return p


@scenario("CR-DURABLE-005")
def quarantine(env: Env) -> list[str]:
    from cycles.client.journal import PendingRecord, record_filename

    rid = env.reserve_raw(1000)
    env.journal_commit(rid, 250, "cr-dur-005")
    part = env.records()[0].parent
    (part / record_filename("corrupt-id")).write_text('{"version": 1, "reservation_id": ')
    future = PendingRecord("future-id", env.proxy.url, commit_body={"x": 1}).to_dict()
    future["version"] = 99
    (part / record_filename("future-id")).write_text(json.dumps(future))
    out, stderr = env.child("replay")
    p: list[str] = []
    names = sorted(Path(q).name for q in out["quarantined"])
    want = sorted(record_filename(i).replace(".json", ".corrupt") for i in ("corrupt-id", "future-id"))
    _check(p, names == want and all(Path(q).exists() for q in out["quarantined"]),
           f"corrupt/unsupported records not quarantined: {names}")
    _check(p, out["settled"] == [[rid, "commit"]] and env.settled_to(250), "other_valid_records_still_replay")
    _check(p, "corrupt" in stderr and "unsupported" in stderr, "corruption_is_reported (stderr)")
    return p


@scenario("CR-DURABLE-006")
def concurrent_replay(env: Env) -> list[str]:
    rid = env.reserve_raw(1000)
    env.journal_commit(rid, 333, "cr-dur-006")
    # both workers' commits are held at the proxy until both have arrived, then reach the server together
    env.proxy.reset([("commit", "gather", 2), ("commit", "gather", 2)], env.journal)
    args = json.dumps({"base_url": env.proxy.url, "api_key": env.key, "tenant": env.tenant,
                       "journal_dir": str(env.journal), "mode": "replay", "read_timeout": 40})
    procs = [subprocess.Popen([sys.executable, "-m", "cycles.conformance.sdk_child", args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    rcs = [pr.wait(60) for pr in procs]
    p: list[str] = []
    _check(p, rcs == [0, 0], f"a replay worker failed: {rcs}")
    commits = env.proxy.of("commit")
    _check(p, sum(c.fault == "gather" for c in commits) == 2 and {c.key for c in commits} == {"cr-dur-006"},
           f"concurrent_commit_same_key: {[(c.key, c.status, c.fault) for c in commits]}")
    _check(p, env.settled_to(333), "settlement_occurs_at_most_once")
    _check(p, not env.records(), "terminal_record_is_removed")
    return p


@scenario("CR-DURABLE-007")
def filenames(env: Env) -> list[str]:
    from cycles.client.journal import Journal, PendingRecord, legacy_filename, record_filename

    p: list[str] = []
    root = env.journal / "filenames"
    j = Journal(root, "http://server", "key", "acme")
    a, b = "res/1", "res_1"
    _check(p, legacy_filename(a) == legacy_filename(b), "test premise: the legacy names collide")
    _check(p, record_filename("résa-1") == "v2-" + hashlib.sha256("résa-1".encode()).hexdigest() + ".json",
           "standard_filename_is_sha256_of_exact_utf8_identifier")
    _check(p, record_filename(a) != record_filename(b), "distinct_identifiers_never_share_a_journal_file")
    j.dir.mkdir(parents=True, exist_ok=True)
    legacy = j.dir / legacy_filename(a)
    legacy.write_text(json.dumps(PendingRecord(a, "http://server", commit_body={"k": 1}).to_dict()))
    j.persist(PendingRecord(b, "http://server", commit_body={"k": 2}))
    j.discard(b)
    _check(p, legacy.exists(), "discarding one identifier deleted another's legacy file")
    j.persist(PendingRecord(b, "http://server", commit_body={"k": 2}))
    report = j.scan()
    _check(p, sorted(r.reservation_id for r in report.records) == [a, b] and not legacy.exists()
           and (j.dir / record_filename(a)).exists() and (j.dir / record_filename(b)).exists(),
           "matching_legacy_record_migrates_without_deleting_collision")
    return p


# ------------------------------------------------------------------------------------------------ boundary


@scenario("CR-BOUNDARY-001")
def missing_actual(env: Env) -> list[str]:
    from cycles.client import CyclesClient, cycles

    p: list[str] = []
    with CyclesClient(env.config()) as c:
        @cycles(400, client=c)
        def work() -> None:
            raise TimeoutError("the provider never answered: actual unknown")

        try:
            work()
            p.append("missing_actual_or_guarded_action_failure_is_surfaced: no exception reached the caller")
        except TimeoutError:
            pass
        c.flush(5)
    _check(p, "commit" not in env.proxy.ops() and "event" not in env.proxy.ops(),
           "no_commit_or_event_without_known_actual")
    _check(p, not env.records() and env.balance()["spent"] == 0, "something was settled without an actual")
    return p
