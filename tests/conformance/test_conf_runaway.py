"""The runaway-agent replica (clients.md §8.2 C): budget 100 000 000, estimate 1 000 000 per call.

Exactly 100 calls may succeed, sequentially, from 16 threads, or from 200 concurrent async calls; the
101st and later get BudgetExceededError (409 BUDGET_EXCEEDED) without running the function, and the
budget ends at exactly remaining 0, never below.
"""

from __future__ import annotations

from .helpers import all_balances_in, amounts

BUDGET = 100_000_000
ESTIMATE = 1_000_000


def check_runaway(sdk, tenant, out, *, expect_denials_at_least: int) -> None:
    assert out["other_error_count"] == 0, out["other_errors"]
    assert out["successes"] == 100, out
    assert out["executions"] == 100, "the guarded function must never run when the reserve is denied"
    assert out["denials"] >= expect_denials_at_least
    err = out["first_denial"]
    assert err["type"] == "BudgetExceededError"
    assert err["status"] == 409 and err["error_code"] == "BUDGET_EXCEEDED"
    assert out["journal_files"] == []

    bal = amounts(tenant.balance(""))
    assert bal == {"allocated": BUDGET, "spent": BUDGET, "reserved": 0, "remaining": 0, "debt": 0}

    creates = sdk.proxy.calls("POST", path="/v1/reservations")
    allowed = [c for c in creates if c.status == 200]
    denied = [c for c in creates if c.status == 409]
    assert len(allowed) == 100
    assert all(c.response_json["decision"] == "ALLOW" for c in allowed)
    assert len(denied) == out["denials"] and all(c.error == "BUDGET_EXCEEDED" for c in denied)
    assert len(creates) == len(allowed) + len(denied)
    commits = sdk.proxy.calls("POST", suffix="/commit")
    assert len(commits) == 100 and all(c.status == 200 for c in commits)
    assert len({c.path for c in commits}) == 100, "each reservation is committed exactly once"
    assert {c.path.split("/")[3] for c in commits} == {c.response_json["reservation_id"] for c in allowed}
    assert not sdk.proxy.calls("POST", suffix="/release")
    # never over-spent: no balance in any answer the SDK received ever went negative
    for ex in sdk.proxy.exchanges:
        for b in all_balances_in(ex.response_json):
            assert b["remaining"]["amount"] >= 0, (ex.method, ex.path, b)


def test_runaway_loop_stops_after_exactly_100_calls(sdk, tenant):
    tenant.budget("", BUDGET)
    out = sdk.run("runaway", mode="loop", estimate=ESTIMATE)
    check_runaway(sdk, tenant, out, expect_denials_at_least=1)
    assert out["denials"] == 1
    # sequentially the SDK reserves, commits, reserves, commits ... and stops at the first 409
    kinds = [(m, p.rsplit("/", 1)[-1], s) for m, p, s in sdk.proxy.summary()]
    assert kinds == [("POST", "reservations", 200), ("POST", "commit", 200)] * 100 + [("POST", "reservations", 409)]


def test_runaway_from_16_threads_allows_exactly_100(sdk, tenant):
    tenant.budget("", BUDGET)
    out = sdk.run("runaway", mode="threads", threads=16, estimate=ESTIMATE)
    # every thread ends with its own denial
    check_runaway(sdk, tenant, out, expect_denials_at_least=16)
    assert out["denials"] == 16


def test_runaway_from_200_concurrent_async_calls_allows_exactly_100(sdk, tenant):
    tenant.budget("", BUDGET)
    out = sdk.run("runaway", mode="async", calls=200, estimate=ESTIMATE)
    check_runaway(sdk, tenant, out, expect_denials_at_least=100)
    assert out["denials"] == 100
