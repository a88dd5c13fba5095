"""GET /v1/reservations (filters, sorting, cursor pagination, include projection) and GET /v1/balances."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Callable

import httpx
import pytest

from support import USD, Server, Tenant, new_tenant
from test_runtime_semantics import (
    TOKENS, check_balances, commit, expect_error, make_tenant, ok, release, reserve_ok, scope_of,
)

SORT_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "reservation_id": lambda r: r["reservation_id"],
    "tenant": lambda r: r["subject"]["tenant"],
    "scope_path": lambda r: r["scope_path"],
    "status": lambda r: r["status"],
    "reserved": lambda r: r["reserved"]["amount"],
    "created_at_ms": lambda r: r["created_at_ms"],
    "expires_at_ms": lambda r: r["expires_at_ms"],
}


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def pages(c: httpx.Client, path: str, items_key: str, **params: Any) -> list[list[dict[str, Any]]]:
    """Follow next_cursor to the end; returns the pages."""
    out = []
    params = dict(params)
    while True:
        body = ok(c.get(path, params=params))
        out.append(body[items_key])
        if not body.get("has_more"):
            assert "next_cursor" not in body
            return out
        assert body["next_cursor"]
        params["cursor"] = body["next_cursor"]
        assert len(out) < 100


class Fixture:
    """Nine reservations with distinct creation times, varied subjects, amounts, expiries and states."""

    AMOUNTS = [50, 10, 30, 10, 70, 20, 90, 40, 60]
    TTLS = [15_000, 12_000, 19_000, 11_000, 17_000, 13_000, 18_000, 14_000, 16_000]
    COMMITTED = {0: {"c": 0}, 3: {"c": 3}, 6: None}  # index -> commit metadata
    RELEASED = {1, 4}

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        tenant.budget("", 1_000_000)
        self.rows: list[dict[str, Any]] = []  # creation order
        with tenant.client() as c:
            for i, (amount, ttl) in enumerate(zip(self.AMOUNTS, self.TTLS)):
                extra: dict[str, Any] = {}
                if i % 2 == 0:
                    extra["metadata"] = {"i": i}
                subject = tenant.subject(workspace=f"w{i % 3 + 1}", agent="a1" if i % 2 == 0 else "a2")
                body = reserve_ok(c, tenant, amount, key=f"key-{i}", subject=subject, ttl_ms=ttl, **extra)
                self.rows.append({"i": i, "id": body["reservation_id"], "ws": f"w{i % 3 + 1}",
                                  "agent": "a1" if i % 2 == 0 else "a2", "key": f"key-{i}"})
                time.sleep(0.004)  # distinct created_at_ms
            for i, meta in self.COMMITTED.items():
                extra = {"metadata": meta} if meta else {}
                ok(commit(c, self.rows[i]["id"], self.AMOUNTS[i] - 1, **extra))
                time.sleep(0.004)
            for i in sorted(self.RELEASED):
                ok(release(c, self.rows[i]["id"]))
                time.sleep(0.004)
            self.summaries = {r["reservation_id"]: r for r in ok(c.get("/v1/reservations", params={"limit": 200}))
                              ["reservations"]}
        assert len(self.summaries) == 9

    def ids(self, pred: Callable[[dict[str, Any]], bool]) -> set[str]:
        return {r["id"] for r in self.rows if pred(r)}

    def status(self, i: int) -> str:
        return "COMMITTED" if i in self.COMMITTED else "RELEASED" if i in self.RELEASED else "ACTIVE"


@pytest.fixture
def fx(tenant: Tenant) -> Fixture:
    return Fixture(tenant)


def listed(c: httpx.Client, **params: Any) -> set[str]:
    rows = [r for page in pages(c, "/v1/reservations", "reservations", limit=200, **params) for r in page]
    ids = [r["reservation_id"] for r in rows]
    assert len(ids) == len(set(ids))
    return set(ids)


def test_summaries_shape(fx: Fixture) -> None:
    for row in fx.rows:
        s = fx.summaries[row["id"]]
        i = row["i"]
        assert s["status"] == fx.status(i)
        assert s["reserved"] == {"unit": USD, "amount": fx.AMOUNTS[i]}
        assert s["expires_at_ms"] - s["created_at_ms"] == fx.TTLS[i]
        assert s["idempotency_key"] == row["key"]
        assert s["scope_path"] == scope_of(fx.tenant, f"workspace:{row['ws']}/agent:{row['agent']}")
        if fx.status(i) == "COMMITTED":
            assert s["committed"] == {"unit": USD, "amount": fx.AMOUNTS[i] - 1}
        else:
            assert "committed" not in s
        if fx.status(i) == "ACTIVE":
            assert "finalized_at_ms" not in s
        else:
            assert s["finalized_at_ms"] >= s["created_at_ms"]
        assert "metadata" not in s and "committed_metadata" not in s  # opt-in only


def test_filters(fx: Fixture) -> None:
    with fx.tenant.client() as c:
        for status in ("ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"):
            assert listed(c, status=status) == fx.ids(lambda r: fx.status(r["i"]) == status)
        assert listed(c, idempotency_key="key-4") == fx.ids(lambda r: r["i"] == 4)
        assert listed(c, idempotency_key="key-none") == set()
        assert listed(c, workspace="w1") == fx.ids(lambda r: r["ws"] == "w1")
        assert listed(c, agent="a2") == fx.ids(lambda r: r["agent"] == "a2")
        assert listed(c, workspace="w2", agent="a1") == fx.ids(lambda r: r["ws"] == "w2" and r["agent"] == "a1")
        assert listed(c, workspace="w2", status="ACTIVE") == fx.ids(
            lambda r: r["ws"] == "w2" and fx.status(r["i"]) == "ACTIVE")
        assert listed(c, app="nope") == set()
        assert listed(c, tenant=fx.tenant.tenant_id) == set(fx.summaries)
        expect_error(c.get("/v1/reservations", params={"status": "BOGUS"}), 400, "INVALID_REQUEST")


def test_time_window_filters(fx: Fixture) -> None:
    s = fx.summaries
    created = sorted(r["created_at_ms"] for r in s.values())
    expires = sorted(r["expires_at_ms"] for r in s.values())
    finalized = sorted(r["finalized_at_ms"] for r in s.values() if "finalized_at_ms" in r)
    assert len(set(created)) == 9 and len(finalized) == 5
    everything = set(s)

    def where(pred: Callable[[dict[str, Any]], bool]) -> set[str]:
        return {rid for rid, r in s.items() if pred(r)}

    with fx.tenant.client() as c:
        mid = created[4]
        assert listed(c, **{"from": iso(mid)}) == where(lambda r: r["created_at_ms"] >= mid)  # inclusive
        assert listed(c, to=iso(mid)) == where(lambda r: r["created_at_ms"] <= mid)
        assert listed(c, **{"from": iso(created[2]), "to": iso(created[5])}) == where(
            lambda r: created[2] <= r["created_at_ms"] <= created[5])
        assert listed(c, **{"from": iso(created[-1] + 1)}) == set()

        lo, hi = expires[1], expires[6]
        assert listed(c, expires_from=iso(lo), expires_to=iso(hi)) == where(lambda r: lo <= r["expires_at_ms"] <= hi)
        assert listed(c, expires_to=iso(lo)) == where(lambda r: r["expires_at_ms"] <= lo)

        # finalized windows only ever match COMMITTED / RELEASED rows
        finalized_rows = where(lambda r: "finalized_at_ms" in r)
        assert listed(c, finalized_from=iso(0)) == finalized_rows
        assert listed(c, finalized_to="2100-01-01T00:00:00Z") == finalized_rows
        f = finalized[2]
        assert listed(c, finalized_from=iso(f)) == where(lambda r: r.get("finalized_at_ms", -1) >= f)
        assert listed(c, finalized_to=iso(f)) == where(lambda r: "finalized_at_ms" in r and r["finalized_at_ms"] <= f)
        # windows combine with AND
        assert listed(c, finalized_from=iso(0), **{"from": iso(mid)}) == where(
            lambda r: "finalized_at_ms" in r and r["created_at_ms"] >= mid)

        # blank bounds are unset
        assert listed(c, **{"from": "", "to": "", "expires_from": "", "expires_to": "", "finalized_from": "",
                            "finalized_to": ""}) == everything
        for lo_name, hi_name in (("from", "to"), ("expires_from", "expires_to"), ("finalized_from", "finalized_to")):
            expect_error(c.get("/v1/reservations", params={lo_name: iso(mid + 1), hi_name: iso(mid)}),
                         400, "INVALID_REQUEST")
        expect_error(c.get("/v1/reservations", params={"from": "yesterday"}), 400, "INVALID_REQUEST")


@pytest.mark.parametrize("sort_by", list(SORT_KEYS))
def test_sorting_and_pagination_visit_every_row_once(fx: Fixture, sort_by: str) -> None:
    key = SORT_KEYS[sort_by]
    with fx.tenant.client() as c:
        for direction in ("asc", "desc"):
            got = pages(c, "/v1/reservations", "reservations", sort_by=sort_by, sort_dir=direction, limit=4)
            assert [len(p) for p in got] == [4, 4, 1]
            rows = [r for p in got for r in p]
            ids = [r["reservation_id"] for r in rows]
            assert len(ids) == len(set(ids)) == 9 and set(ids) == set(fx.summaries)
            values = [key(r) for r in rows]
            assert values == sorted(values, reverse=(direction == "desc")), (sort_by, direction, values)


def test_default_order_is_created_at_descending(fx: Fixture) -> None:
    with fx.tenant.client() as c:
        rows = [r for p in pages(c, "/v1/reservations", "reservations", limit=2) for r in p]
    assert [r["reservation_id"] for r in rows] == [r["id"] for r in reversed(fx.rows)]


def test_cursor_is_bound_to_filters_but_not_to_include(fx: Fixture) -> None:
    with fx.tenant.client() as c:
        first = ok(c.get("/v1/reservations", params={"limit": 2, "sort_by": "reserved", "sort_dir": "asc",
                                                     "include": "metadata"}))
        cursor = first["next_cursor"]
        base = {"limit": 2, "sort_by": "reserved", "sort_dir": "asc", "cursor": cursor}
        for changed in ({"sort_dir": "desc"}, {"sort_by": "expires_at_ms"}, {"status": "ACTIVE"},
                        {"workspace": "w1"}, {"from": iso(0)}, {"expires_to": "2100-01-01T00:00:00Z"},
                        {"finalized_from": iso(0)}, {"idempotency_key": "key-1"}):
            expect_error(c.get("/v1/reservations", params={**base, **changed}), 400, "INVALID_REQUEST")
        expect_error(c.get("/v1/reservations", params={"cursor": "not-a-cursor"}), 400, "INVALID_REQUEST")
        # include is projection only: switching it mid-pagination is fine
        second = ok(c.get("/v1/reservations", params={**base, "include": "committed_metadata"}))
        same = ok(c.get("/v1/reservations", params=base))
        assert [r["reservation_id"] for r in second["reservations"]] == [r["reservation_id"] for r in
                                                                         same["reservations"]]
        seen = {r["reservation_id"] for r in first["reservations"]}
        assert seen.isdisjoint(r["reservation_id"] for r in second["reservations"])


def test_include_projection(fx: Fixture) -> None:
    def project(c: httpx.Client, include: str | None) -> dict[str, dict[str, Any]]:
        params = {"limit": 200, **({"include": include} if include is not None else {})}
        return {r["reservation_id"]: r for r in ok(c.get("/v1/reservations", params=params))["reservations"]}

    by_i = {row["i"]: row["id"] for row in fx.rows}
    with fx.tenant.client() as c:
        for include in (None, "", ",", "evidence,unknown"):
            rows = project(c, include)
            assert all("metadata" not in r and "committed_metadata" not in r for r in rows.values())
        rows = project(c, "metadata")
        assert {rid for rid, r in rows.items() if "metadata" in r} == {by_i[i] for i in range(0, 9, 2)}
        assert rows[by_i[2]]["metadata"] == {"i": 2}
        assert all("committed_metadata" not in r for r in rows.values())
        rows = project(c, "committed_metadata")
        assert {rid for rid, r in rows.items() if "committed_metadata" in r} == {by_i[0], by_i[3]}
        assert rows[by_i[3]]["committed_metadata"] == {"c": 3}
        assert all("metadata" not in r for r in rows.values())
        rows = project(c, " metadata , committed_metadata ,")
        assert rows[by_i[0]]["metadata"] == {"i": 0} and rows[by_i[0]]["committed_metadata"] == {"c": 0}
        # committed is never gated by include
        assert rows[by_i[6]]["committed"]["amount"] == fx.AMOUNTS[6] - 1 and "committed_metadata" not in rows[by_i[6]]
        # the single-row GET always carries both maps
        detail = ok(c.get(f"/v1/reservations/{by_i[0]}"))
        assert detail["metadata"] == {"i": 0} and detail["committed_metadata"] == {"c": 0}


def test_list_limit_bounds_and_isolation(server: Server, fx: Fixture) -> None:
    with fx.tenant.client() as c:
        for bad in ("0", "201", "x"):
            expect_error(c.get("/v1/reservations", params={"limit": bad}), 400, "INVALID_REQUEST")
        assert len(ok(c.get("/v1/reservations", params={"limit": 200}))["reservations"]) == 9
    other = new_tenant(server)
    with other.client() as c:
        assert ok(c.get("/v1/reservations"))["reservations"] == []
    with server.admin() as admin:
        assert listed(admin, tenant=fx.tenant.tenant_id) == set(fx.summaries)
        assert listed(admin, tenant=fx.tenant.tenant_id, status="RELEASED") == fx.ids(lambda r: r["i"] in fx.RELEASED)
        assert listed(admin, tenant=other.tenant_id) == set()


# ---------------------------------------------------------------------------------------------
# balances
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def budgets(server: Server) -> Tenant:
    tenant = make_tenant(server)
    for suffix in ("", "workspace:w1", "workspace:w1/agent:a1", "workspace:w2", "app:x"):
        tenant.budget(suffix, 1_000)
    tenant.budget("", 50, unit=TOKENS)
    # A second tenant with the same workspace name must never leak into the first tenant's results.
    other = new_tenant(server)
    other.budget("workspace:w1", 5)
    return tenant


def balance_keys(c: httpx.Client, **params: Any) -> list[tuple[str, str]]:
    rows = [b for page in pages(c, "/v1/balances", "balances", limit=200, **params) for b in page]
    check_balances(rows)
    keys = [(b["scope"], b["remaining"]["unit"]) for b in rows]
    assert len(keys) == len(set(keys))
    return keys


def test_balance_filters_and_children(budgets: Tenant) -> None:
    t = budgets
    s = lambda suffix="": scope_of(t, suffix)  # noqa: E731
    everything = {(s(), USD), (s(), TOKENS), (s("workspace:w1"), USD), (s("workspace:w1/agent:a1"), USD),
                  (s("workspace:w2"), USD), (s("app:x"), USD)}
    with t.client() as c:
        assert set(balance_keys(c, tenant=t.tenant_id)) == {(s(), USD), (s(), TOKENS)}
        assert set(balance_keys(c, tenant=t.tenant_id, include_children="true")) == everything
        assert set(balance_keys(c, workspace="w1")) == {(s("workspace:w1"), USD)}
        assert set(balance_keys(c, workspace="w1", include_children="true")) == {
            (s("workspace:w1"), USD), (s("workspace:w1/agent:a1"), USD)}
        assert set(balance_keys(c, workspace="w1", agent="a1")) == {(s("workspace:w1/agent:a1"), USD)}
        assert set(balance_keys(c, app="x")) == {(s("app:x"), USD)}
        assert balance_keys(c, workspace="nope") == []
        expect_error(c.get("/v1/balances"), 400, "INVALID_REQUEST")
        expect_error(c.get("/v1/balances", params={"include_children": "true"}), 400, "INVALID_REQUEST")


def test_balance_values_track_the_ledger(budgets: Tenant) -> None:
    t = budgets
    with t.client() as c:
        rid = reserve_ok(c, t, 100, subject=t.subject(workspace="w1", agent="a1"))["reservation_id"]
        ok(commit(c, rid, 30))
        reserve_ok(c, t, 20, subject=t.subject(workspace="w1"))
        rows = {b["scope"]: b for b in ok(c.get("/v1/balances", params={"workspace": "w1",
                                                                         "include_children": "true"}))["balances"]}
    check_balances(list(rows.values()))
    w1, a1 = rows[scope_of(t, "workspace:w1")], rows[scope_of(t, "workspace:w1/agent:a1")]
    assert (w1["spent"]["amount"], w1["reserved"]["amount"], w1["remaining"]["amount"]) == (30, 20, 950)
    assert (a1["spent"]["amount"], a1["reserved"]["amount"], a1["remaining"]["amount"]) == (30, 0, 970)
    assert a1["debt"]["amount"] == 0 and a1["is_over_limit"] is False


def test_balance_pagination(budgets: Tenant) -> None:
    t = budgets
    with t.client() as c:
        full = balance_keys(c, tenant=t.tenant_id, include_children="true")
        got = pages(c, "/v1/balances", "balances", tenant=t.tenant_id, include_children="true", limit=2)
        assert [len(p) for p in got] == [2, 2, 2]
        flat = [(b["scope"], b["remaining"]["unit"]) for p in got for b in p]
        assert len(flat) == len(set(flat)) and set(flat) == set(full)
        first = ok(c.get("/v1/balances", params={"tenant": t.tenant_id, "include_children": "true", "limit": 2}))
        assert first["has_more"] is True
        expect_error(c.get("/v1/balances", params={"tenant": t.tenant_id, "limit": 2, "cursor": first["next_cursor"]}),
                     400, "INVALID_REQUEST")
        for bad in ("0", "201"):
            expect_error(c.get("/v1/balances", params={"tenant": t.tenant_id, "limit": bad}), 400, "INVALID_REQUEST")
