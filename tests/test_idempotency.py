"""Idempotency (cycles-protocol-v0 §IDEMPOTENCY): per (effective tenant, endpoint, key), replays return the
original outcome verbatim except the recomputed remaining_ttl_ms, and a reused key with another payload is
409 IDEMPOTENCY_MISMATCH."""

from __future__ import annotations

import time
from typing import Any

import pytest

from support import USD, Server, Tenant, new_tenant, reserve_body
from test_runtime_leases import SLACK, now_ms, wait_until_past
from test_runtime_semantics import (
    all_balances, bal, commit, fund, decide, event, expect_error, extend, get_reservation, new_key, ok, release,
    reserve, reserve_ok,
)


def without_ttl(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "remaining_ttl_ms"}


def test_reserve_replay_returns_original_with_recomputed_ttl(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    key = new_key()
    with tenant.client() as c:
        first = reserve_ok(c, tenant, 100, key=key, ttl_ms=10_000, metadata={"a": 1})
        time.sleep(0.3)
        before = all_balances(tenant)
        t0 = now_ms()
        again = ok(reserve(c, tenant, 100, key=key, ttl_ms=10_000, metadata={"a": 1}))
        t1 = now_ms()
        assert again["reservation_id"] == first["reservation_id"]
        assert without_ttl(again) == without_ttl(first)  # balances snapshot included, verbatim
        assert 0 < again["remaining_ttl_ms"] <= first["remaining_ttl_ms"] - 250  # recomputed, not copied
        assert (first["expires_at_ms"] - t1 - SLACK <= again["remaining_ttl_ms"]
                <= first["expires_at_ms"] - t0 + SLACK)
        assert all_balances(tenant) == before  # no second hold
        assert len(ok(c.get("/v1/reservations"))["reservations"]) == 1

        ok(commit(c, first["reservation_id"], 40))
        after = ok(reserve(c, tenant, 100, key=key, ttl_ms=10_000, metadata={"a": 1}))
        assert after["remaining_ttl_ms"] == 0  # no longer ACTIVE
        assert without_ttl(after) == without_ttl(first)


def test_reserve_replay_ttl_zero_after_release_and_expiry(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    k1, k2 = new_key(), new_key()
    with tenant.client() as c:
        released = reserve_ok(c, tenant, 10, key=k1, ttl_ms=30_000)
        ok(release(c, released["reservation_id"]))
        replay = ok(reserve(c, tenant, 10, key=k1, ttl_ms=30_000))
        assert replay["remaining_ttl_ms"] == 0 and without_ttl(replay) == without_ttl(released)

        short = reserve_ok(c, tenant, 10, key=k2, ttl_ms=1_000, grace_period_ms=5_000)
        wait_until_past(short["expires_at_ms"])
        replay = ok(reserve(c, tenant, 10, key=k2, ttl_ms=1_000, grace_period_ms=5_000))
        assert replay["remaining_ttl_ms"] == 0 and without_ttl(replay) == without_ttl(short)


def test_reserve_key_mismatch(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    key = new_key()
    with tenant.client() as c:
        reserve_ok(c, tenant, 100, key=key)
        before = all_balances(tenant)
        for changed in ({"amount": 101}, {"ttl_ms": 5_000}, {"metadata": {"x": 1}},
                        {"subject": tenant.subject(workspace="w")}, {"overage_policy": "REJECT"}):
            amount = changed.pop("amount", 100)
            expect_error(reserve(c, tenant, amount, key=key, **changed), 409, "IDEMPOTENCY_MISMATCH")
        assert all_balances(tenant) == before


def test_live_and_dry_run_share_the_key_space(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    live_key, dry_key = new_key(), new_key()
    with tenant.client() as c:
        reserve_ok(c, tenant, 10, key=live_key)
        expect_error(reserve(c, tenant, 10, key=live_key, dry_run=True), 409, "IDEMPOTENCY_MISMATCH")
        dry = ok(reserve(c, tenant, 10, key=dry_key, dry_run=True))
        expect_error(reserve(c, tenant, 10, key=dry_key), 409, "IDEMPOTENCY_MISMATCH")
        assert ok(reserve(c, tenant, 10, key=dry_key, dry_run=True)) == dry
    assert bal(tenant)["reserved"] == 10


def test_dry_run_and_decide_replay_the_original_decision(tenant: Tenant) -> None:
    tenant.budget("", 100)
    dry_key, decide_key = new_key(), new_key()
    with tenant.client() as c:
        dry = ok(reserve(c, tenant, 100, key=dry_key, dry_run=True))
        d = ok(decide(c, tenant, 100, key=decide_key))
        assert dry["decision"] == d["decision"] == "ALLOW"
        reserve_ok(c, tenant, 100)  # now nothing is left
        assert ok(decide(c, tenant, 100))["decision"] == "DENY"
        assert ok(reserve(c, tenant, 100, key=dry_key, dry_run=True)) == dry
        assert ok(decide(c, tenant, 100, key=decide_key)) == d
        expect_error(decide(c, tenant, 99, key=decide_key), 409, "IDEMPOTENCY_MISMATCH")
        # decide and reserve are different endpoints: the same key is independent on each
        assert reserve_ok(c, tenant, 0, key=decide_key)["decision"] == "ALLOW"


def test_commit_replay_and_mismatch(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    key = new_key()
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100)["reservation_id"]
        first = ok(commit(c, rid, 70, key=key, metadata={"m": 1}))
        before = all_balances(tenant)
        assert ok(commit(c, rid, 70, key=key, metadata={"m": 1})) == first
        assert all_balances(tenant) == before  # charged once
        expect_error(commit(c, rid, 71, key=key, metadata={"m": 1}), 409, "IDEMPOTENCY_MISMATCH")
        expect_error(commit(c, rid, 70, key=key), 409, "IDEMPOTENCY_MISMATCH")
        # a new key on the now-committed reservation is a fresh request
        expect_error(commit(c, rid, 70), 409, "RESERVATION_FINALIZED")
        # the key is per endpoint, not per reservation: reusing it on another reservation is a mismatch
        rid2 = reserve_ok(c, tenant, 100)["reservation_id"]
        expect_error(commit(c, rid2, 70, key=key, metadata={"m": 1}), 409, "IDEMPOTENCY_MISMATCH")
        assert ok(get_reservation(c, rid2))["status"] == "ACTIVE"
    assert bal(tenant)["spent"] == 70


def test_commit_replay_after_the_lease_ran_out(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    key = new_key()
    with tenant.client() as c:
        body = reserve_ok(c, tenant, 100, ttl_ms=1_000, grace_period_ms=0)
        first = ok(commit(c, body["reservation_id"], 90, key=key))
        wait_until_past(body["expires_at_ms"] + 200)
        assert ok(commit(c, body["reservation_id"], 90, key=key)) == first
        # and a commit first made during the grace window replays after the grace window too
        graced = reserve_ok(c, tenant, 100, ttl_ms=1_000, grace_period_ms=1_000)
        wait_until_past(graced["expires_at_ms"])
        in_grace = ok(commit(c, graced["reservation_id"], 100, key=key + "-g"))
        wait_until_past(graced["expires_at_ms"] + 1_000)
        assert ok(commit(c, graced["reservation_id"], 100, key=key + "-g")) == in_grace
    assert bal(tenant)["spent"] == 190


def test_release_replay_and_mismatch(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    key = new_key()
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100)["reservation_id"]
        first = ok(release(c, rid, key=key, reason="done"))
        assert ok(release(c, rid, key=key, reason="done")) == first
        expect_error(release(c, rid, key=key, reason="other"), 409, "IDEMPOTENCY_MISMATCH")
        expect_error(release(c, rid), 409, "RESERVATION_FINALIZED")
    assert bal(tenant)["reserved"] == 0 and bal(tenant)["remaining"] == 1_000


def test_extend_replay_recomputes_ttl_and_does_not_extend_twice(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    key = new_key()
    with tenant.client() as c:
        body = reserve_ok(c, tenant, 10, ttl_ms=10_000)
        rid = body["reservation_id"]
        first = ok(extend(c, rid, 2_000, key=key))
        assert first["expires_at_ms"] == body["expires_at_ms"] + 2_000
        time.sleep(0.3)
        again = ok(extend(c, rid, 2_000, key=key))
        assert without_ttl(again) == without_ttl(first)
        assert 0 < again["remaining_ttl_ms"] <= first["remaining_ttl_ms"] - 250
        assert ok(get_reservation(c, rid))["expires_at_ms"] == first["expires_at_ms"]
        expect_error(extend(c, rid, 2_001, key=key), 409, "IDEMPOTENCY_MISMATCH")
        ok(commit(c, rid, 10))
        done = ok(extend(c, rid, 2_000, key=key))
        assert done["remaining_ttl_ms"] == 0 and without_ttl(done) == without_ttl(first)


def test_event_replay_and_mismatch(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    key = new_key()
    with tenant.client() as c:
        first = ok(event(c, tenant, 25, key=key), 201)
        assert ok(event(c, tenant, 25, key=key), 201) == first
        expect_error(event(c, tenant, 26, key=key), 409, "IDEMPOTENCY_MISMATCH")
        expect_error(event(c, tenant, 25, key=key, overage_policy="REJECT"), 409, "IDEMPOTENCY_MISMATCH")
    assert bal(tenant)["spent"] == 25


def test_commit_and_event_keys_are_separate_namespaces(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    key = new_key()
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100, key=key)["reservation_id"]
        ok(commit(c, rid, 50, key=key))
        ok(event(c, tenant, 7, key=key), 201)
        rid2 = reserve_ok(c, tenant, 100)["reservation_id"]
        ok(release(c, rid2, key=key))
        ok(extend(c, reserve_ok(c, tenant, 1)["reservation_id"], 1_000, key=key))
        assert ok(decide(c, tenant, 1, key=key))["decision"] == "ALLOW"
    assert bal(tenant)["spent"] == 57


def test_same_key_in_two_tenants_is_independent(server: Server, tenant: Tenant) -> None:
    other = new_tenant(server)
    tenant.budget("", 1_000)
    other.budget("", 1_000)
    key = new_key()
    with tenant.client() as a, other.client() as b:
        ra = reserve_ok(a, tenant, 100, key=key)
        rb = reserve_ok(b, other, 300, key=key)  # different payload, other tenant: no mismatch
        assert ra["reservation_id"] != rb["reservation_id"]
        ca = ok(commit(a, ra["reservation_id"], 10, key=key))
        cb = ok(commit(b, rb["reservation_id"], 20, key=key))
        assert ca["charged"]["amount"] == 10 and cb["charged"]["amount"] == 20
        ok(event(a, tenant, 1, key=key), 201)
        ok(event(b, other, 2, key=key), 201)
        assert ok(decide(a, tenant, 1, key=key))["decision"] == ok(decide(b, other, 5, key=key))["decision"] == "ALLOW"
    assert bal(tenant)["spent"] == 11 and bal(other)["spent"] == 22
    r1 = ok(fund(tenant, "", "CREDIT", 5, idempotency_key=key))
    r2 = ok(fund(other, "", "CREDIT", 9, idempotency_key=key))
    assert r1["new_allocated"]["amount"] == 1_005 and r2["new_allocated"]["amount"] == 1_009


def test_failed_requests_are_not_remembered(tenant: Tenant) -> None:
    tenant.budget("", 100)
    key = new_key()
    with tenant.client() as c:
        expect_error(reserve(c, tenant, 150, key=key), 409, "BUDGET_EXCEEDED")
        ok(fund(tenant, "", "CREDIT", 100))
        body = reserve_ok(c, tenant, 150, key=key)
        assert ok(reserve(c, tenant, 150, key=key))["reservation_id"] == body["reservation_id"]


def test_fund_replay_and_mismatch(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    tenant.budget("workspace:w", 1_000)
    key = new_key()
    first = ok(fund(tenant, "", "CREDIT", 100, idempotency_key=key))
    time.sleep(0.01)
    assert ok(fund(tenant, "", "CREDIT", 100, idempotency_key=key)) == first  # same body, timestamp included
    assert bal(tenant)["allocated"] == 1_100  # credited once
    expect_error(fund(tenant, "", "CREDIT", 101, idempotency_key=key), 409, "IDEMPOTENCY_MISMATCH")
    expect_error(fund(tenant, "", "DEBIT", 100, idempotency_key=key), 409, "IDEMPOTENCY_MISMATCH")
    expect_error(fund(tenant, "workspace:w", "CREDIT", 100, idempotency_key=key), 409, "IDEMPOTENCY_MISMATCH")
    assert bal(tenant)["allocated"] == 1_100 and bal(tenant, "workspace:w")["allocated"] == 1_000
    # without a key every call applies
    ok(fund(tenant, "", "CREDIT", 1))
    ok(fund(tenant, "", "CREDIT", 1))
    assert bal(tenant)["allocated"] == 1_102


@pytest.mark.parametrize("op", ["reserve", "decide", "event", "commit", "release", "extend"])
def test_header_and_body_key_must_match(tenant: Tenant, op: str) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 10)["reservation_id"]
        body_key = new_key()
        path, body = {
            "reserve": ("/v1/reservations", reserve_body(tenant, 1, key=body_key)),
            "decide": ("/v1/decide", {"idempotency_key": body_key, "subject": tenant.subject(),
                                      "action": {"kind": "k", "name": "n"}, "estimate": {"unit": USD, "amount": 1}}),
            "event": ("/v1/events", {"idempotency_key": body_key, "subject": tenant.subject(),
                                     "action": {"kind": "k", "name": "n"}, "actual": {"unit": USD, "amount": 1}}),
            "commit": (f"/v1/reservations/{rid}/commit", {"idempotency_key": body_key,
                                                          "actual": {"unit": USD, "amount": 1}}),
            "release": (f"/v1/reservations/{rid}/release", {"idempotency_key": body_key}),
            "extend": (f"/v1/reservations/{rid}/extend", {"idempotency_key": body_key, "extend_by_ms": 1_000}),
        }[op]
        before = all_balances(tenant)
        expect_error(c.post(path, json=body, headers={"X-Idempotency-Key": body_key + "x"}), 400, "INVALID_REQUEST")
        assert all_balances(tenant) == before
        assert ok(get_reservation(c, rid))["status"] == "ACTIVE"
        r = c.post(path, json=body, headers={"X-Idempotency-Key": body_key})
        assert r.status_code in (200, 201), r.text
        again = c.post(path, json=body, headers={"X-Idempotency-Key": body_key})
        assert again.status_code == r.status_code
        if op not in ("reserve", "extend"):
            assert again.json() == r.json()
        else:
            assert without_ttl(again.json()) == without_ttl(r.json())


def test_payload_comparison_ignores_key_order_and_whitespace(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    key = new_key()
    compact = (f'{{"idempotency_key":"{key}","subject":{{"tenant":"{tenant.tenant_id}","agent":"a"}},'
               f'"action":{{"kind":"k","name":"n"}},"estimate":{{"unit":"USD_MICROCENTS","amount":5}}}}')
    reordered = (f'{{ "estimate": {{ "amount": 5, "unit": "USD_MICROCENTS" }},\n'
                 f'  "action": {{"name": "n", "kind": "k"}},'
                 f' "subject": {{"agent": "a", "tenant": "{tenant.tenant_id}"}}, "idempotency_key": "{key}" }}')
    headers = {"Content-Type": "application/json"}
    with tenant.client() as c:
        first = ok(c.post("/v1/reservations", content=compact, headers=headers))
        again = ok(c.post("/v1/reservations", content=reordered, headers=headers))
        assert again["reservation_id"] == first["reservation_id"]
        assert without_ttl(again) == without_ttl(first)
    assert bal(tenant)["reserved"] == 5


def test_failed_commit_key_can_be_retried_with_another_payload(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    key = new_key()
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100, overage_policy="REJECT")["reservation_id"]
        expect_error(commit(c, rid, 150, key=key), 409, "BUDGET_EXCEEDED")
        body = ok(commit(c, rid, 100, key=key))
        assert body["charged"]["amount"] == 100
        assert ok(commit(c, rid, 100, key=key)) == body
    assert bal(tenant)["spent"] == 100
