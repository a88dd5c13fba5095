"""Trims of the per-request work on the hot path that must not change what is stored or answered: the SQLite
reservation row written with constants as SQL literals holds the same values of the same types as when every
column was bound, and the idempotency payload hash comes from one encoder built once."""

from __future__ import annotations

import sqlite3
import uuid
from urllib.parse import urlparse

import httpx
import msgspec
import pytest

from cycles.protocol import models as m
from cycles.store.sqlite.common import _RES_KEYS
from cycles.store.sqlite.schema import RESERVATION_COLUMNS
from support import Tenant, reserve_body

USD = "USD_MICROCENTS"
_COLUMNS = [c.strip().split()[0] for c in RESERVATION_COLUMNS.strip().split(",") if c.strip() and "(" not in c]


def _typed(conn: sqlite3.Connection, table: str, rid: str) -> list[tuple[str, str]]:
    """(typeof, quote) of every column of the row: what decides the bytes of SQLite's record."""
    cols = ", ".join(f"typeof({c}), quote({c})" for c in _COLUMNS)
    row = conn.execute(f"SELECT {cols} FROM {table} WHERE reservation_id=?", (rid,)).fetchone()
    return list(zip(row[::2], row[1::2]))


def test_reservation_rows_are_the_rows_every_column_bound_would_write(tenant: Tenant, store_kind: str) -> None:
    if store_kind != "sqlite":
        pytest.skip("the SQLite store's rows")
    tenant.budget()
    rids = []
    with tenant.client() as c:
        for metadata in (None, {"b": 2, "a": [1, "x"]}):
            extra = {"metadata": metadata} if metadata else {}
            r = c.post("/v1/reservations", json=reserve_body(tenant, 10, **extra))
            assert r.status_code == 200, r.text
            rids.append(r.json()["reservation_id"])
        active = c.post("/v1/reservations", json=reserve_body(tenant, 10)).json()["reservation_id"]
        for rid, metadata in zip(rids, (None, {"k": "v"})):
            body = {"idempotency_key": uuid.uuid4().hex, "actual": {"unit": USD, "amount": 4}}
            if metadata:
                body["metadata"] = metadata
            assert c.post(f"/v1/reservations/{rid}/commit", json=body).status_code == 200
    path = "/" + urlparse(tenant.server.store_url).path.lstrip("/")
    stored = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    ref = sqlite3.connect(":memory:")
    ref.execute(f"CREATE TABLE reservations ({RESERVATION_COLUMNS}) WITHOUT ROWID")
    for rid in [*rids, active]:
        values = dict(zip(_COLUMNS, stored.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM reservations WHERE reservation_id=?", (rid,)).fetchone()))
        if rid == active:  # the row as the reserve wrote it, every column bound as a Python value
            assert values["status"] == "ACTIVE" and values["extensions"] == 0
            values.update(status="ACTIVE", committed=None, committed_metadata=None, finalized_at_ms=None, extensions=0)
        else:  # the columns a commit sets, bound as before
            assert values["status"] == "COMMITTED" and values["committed"] == 4
        ref.execute(f"INSERT INTO reservations ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                    [values[c] for c in _COLUMNS])
        assert _typed(stored, "reservations", rid) == _typed(ref, "reservations", rid)
    kinds = {rid: dict(zip(_COLUMNS, _typed(stored, "reservations", rid))) for rid in [*rids, active]}
    assert kinds[active]["committed"] == kinds[active]["finalized_at_ms"] == ("null", "NULL")
    assert kinds[active]["extensions"] == ("integer", "0")
    assert kinds[rids[0]]["committed_metadata"] == ("null", "NULL")
    assert kinds[rids[1]]["committed_metadata"][0] == "text"
    assert set(_COLUMNS) == set(_RES_KEYS) | {"s_workspace", "s_app", "s_workflow", "s_agent", "s_toolset",
                                              "commit_limits", "payload_hash", "result", "quota_runs"}


def test_canonical_payload_encoding_is_unchanged() -> None:
    req = msgspec.json.decode(
        b'{"idempotency_key":"k","subject":{"tenant":"t","agent":"a"},"action":{"kind":"llm.completion","name":"n"},'
        b'"estimate":{"unit":"USD_MICROCENTS","amount":5},"metadata":{"z":1,"a":{"y":2,"b":[3]}}}',
        type=m.ReservationCreateRequest)
    assert m.canonical(req) == msgspec.json.encode(req, order="sorted")
    assert m.canonical(req).index(b'"a":{"b":[3],"y":2}') < m.canonical(req).index(b'"z":1')


def test_merged_precondition_reads_keep_the_order_of_checks(tenant: Tenant, server) -> None:  # noqa: ANN001
    """Reserve reads the generation and both idempotency records in one statement, commit the generation and its
    stored answer in one (SQLite): a replay is the first answer (a commit's byte for byte; a reserve's but for
    remaining_ttl_ms, read at the replay), a reused key with another payload
    is a mismatch, and ownership is still decided before any replay or mismatch of another tenant's request."""
    from support import new_tenant

    tenant.budget()
    other = new_tenant(server)
    other.budget()
    with tenant.client() as c, other.client() as o:
        body = reserve_body(tenant, 10)
        first = c.post("/v1/reservations", json=body)
        assert first.status_code == 200, first.text
        again = c.post("/v1/reservations", json=body)
        assert again.status_code == 200
        drop_ttl = lambda r: {k: v for k, v in r.json().items() if k != "remaining_ttl_ms"}  # noqa: E731 (read at replay)
        assert drop_ttl(again) == drop_ttl(first)
        changed = {**body, "estimate": {"unit": USD, "amount": 11}}
        assert c.post("/v1/reservations", json=changed).json()["error"] == "IDEMPOTENCY_MISMATCH"
        rid = first.json()["reservation_id"]

        commit = {"idempotency_key": uuid.uuid4().hex, "actual": {"unit": USD, "amount": 7}}
        done = c.post(f"/v1/reservations/{rid}/commit", json=commit)
        assert done.status_code == 200, done.text
        replay = c.post(f"/v1/reservations/{rid}/commit", json=commit)
        assert replay.status_code == 200 and replay.content == done.content
        mismatch = c.post(f"/v1/reservations/{rid}/commit", json={**commit, "actual": {"unit": USD, "amount": 8}})
        assert mismatch.status_code == 409 and mismatch.json()["error"] == "IDEMPOTENCY_MISMATCH"

        # the other tenant used the same commit key on its own reservation, with another payload: acting on
        # this tenant's reservation with it is refused for ownership, not answered as its mismatch or replay
        own = o.post("/v1/reservations", json=reserve_body(other, 10)).json()["reservation_id"]
        assert o.post(f"/v1/reservations/{own}/commit", json=commit).status_code == 200
        live = c.post("/v1/reservations", json=reserve_body(tenant, 10)).json()["reservation_id"]
        for key in (commit["idempotency_key"], uuid.uuid4().hex):
            r = o.post(f"/v1/reservations/{live}/commit", json={**commit, "idempotency_key": key})
            assert r.status_code == 403 and r.json()["error"] == "FORBIDDEN", r.text


def test_a_cached_key_is_refused_once_it_expires(tenant: Tenant, server) -> None:  # noqa: ANN001
    """The runtime routes answer a cached key without reading the store; its expiry is still checked per request
    (Authenticator.cached_runtime), so a key that expires while cached is refused at once."""
    import time
    from datetime import datetime, timezone

    tenant.budget()
    expires = datetime.fromtimestamp(time.time() + 2.5, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    with server.admin() as a:
        r = a.post("/v1/admin/api-keys", json={"tenant_id": tenant.tenant_id, "name": "short",
                                               "permissions": ["reservations:create"], "expires_at": expires})
        assert r.status_code == 201, r.text
    key = r.json()["key_secret"]
    with httpx.Client(base_url=server.base_url, headers={"X-Cycles-API-Key": key}, timeout=30) as c:
        assert c.post("/v1/reservations", json=reserve_body(tenant, 1)).status_code == 200  # now cached
        assert c.post("/v1/reservations", json=reserve_body(tenant, 1)).status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = c.post("/v1/reservations", json=reserve_body(tenant, 1))
            if r.status_code != 200:
                break
            time.sleep(0.2)
        assert r.status_code == 401 and r.json()["error"] == "UNAUTHORIZED", r.text
