"""The low-level CyclesClient against our server: errors, idempotency and namespaces.
Each case returns the raw CyclesResponses (status, body, exposed headers) for the test to assert on."""

from __future__ import annotations

import time
import uuid
from typing import Any

from _common import config, emit, params, response_info

from runcycles import (
    Action, Amount, CommitRequest, CyclesClient, EventCreateRequest, ReleaseRequest, ReservationCreateRequest,
    ReservationExtendRequest, Subject, Unit,
)

p = params()
case = p["case"]
client = CyclesClient(config(p))
out: dict[str, Any] = {"case": case}
ACTION = Action(kind="llm.completion", name="conformance-lowlevel")


def key() -> str:
    return f"k-{uuid.uuid4().hex}"


def create(c: CyclesClient = client, amount: int = 1000, k: str | None = None, tenant: str | None = None,
           unit: Unit = Unit.USD_MICROCENTS) -> Any:
    return c.create_reservation(ReservationCreateRequest(
        idempotency_key=k or key(), subject=Subject(tenant=tenant or p["tenant"]), action=ACTION,
        estimate=Amount(unit=unit, amount=amount), ttl_ms=60_000))


def commit(rid: str, amount: int, k: str | None = None, unit: Unit = Unit.USD_MICROCENTS,
           c: CyclesClient = client) -> Any:
    return c.commit_reservation(rid, CommitRequest(idempotency_key=k or key(), actual=Amount(unit=unit, amount=amount)))


if case == "wrong_key":
    bad = CyclesClient(config(p, api_key="cyc_live_not-a-real-key-0000000000"))
    out["create"] = response_info(create(bad))
    out["balances"] = response_info(bad.get_balances(tenant=p["tenant"]))
    bad.close()
elif case == "foreign":
    other = CyclesClient(config(p, api_key=p["other_api_key"], tenant=p["other_tenant"]))
    created = create()
    rid = created.body["reservation_id"]
    out["create"] = response_info(created)
    out["other_get"] = response_info(other.get_reservation(rid))
    out["other_commit"] = response_info(commit(rid, 500, c=other))
    out["other_release"] = response_info(other.release_reservation(rid, ReleaseRequest(idempotency_key=key())))
    out["other_extend"] = response_info(other.extend_reservation(
        rid, ReservationExtendRequest(idempotency_key=key(), extend_by_ms=1000)))
    # a subject naming the owner tenant is refused for the other tenant's key
    out["other_create_for_owner"] = response_info(create(other, tenant=p["tenant"]))
    out["owner_get"] = response_info(client.get_reservation(rid))
    other.close()
elif case == "unknown":
    rid = f"rsv_{uuid.uuid4().hex}"
    out["get"] = response_info(client.get_reservation(rid))
    out["commit"] = response_info(commit(rid, 1))
    out["release"] = response_info(client.release_reservation(rid, ReleaseRequest(idempotency_key=key())))
    out["extend"] = response_info(client.extend_reservation(
        rid, ReservationExtendRequest(idempotency_key=key(), extend_by_ms=1000)))
elif case == "unit_mismatch":
    created = create(amount=1000)
    rid = created.body["reservation_id"]
    out["create"] = response_info(created)
    out["commit_tokens"] = response_info(commit(rid, 700, unit=Unit.TOKENS))
    out["get_after_mismatch"] = response_info(client.get_reservation(rid))
    out["commit_usd"] = response_info(commit(rid, 700))
elif case == "idem_mismatch":
    k = key()
    out["first"] = response_info(create(amount=1000, k=k))
    out["second"] = response_info(create(amount=2000, k=k))
elif case == "replay":
    k = key()
    first = create(amount=1000, k=k)
    time.sleep(0.05)
    second = create(amount=1000, k=k)
    out["first"], out["second"] = response_info(first), response_info(second)
    rid = first.body["reservation_id"]
    ck = key()
    out["commit1"] = response_info(commit(rid, 600, k=ck))
    out["commit2"] = response_info(commit(rid, 600, k=ck))
    out["commit_new_key"] = response_info(commit(rid, 600))
    out["create_after_commit"] = response_info(create(amount=1000, k=k))
    out["list_by_key"] = response_info(client.list_reservations(idempotency_key=k))
elif case == "commit_key_on_events":
    created = create(amount=1000)
    rid = created.body["reservation_id"]
    ck = key()
    out["commit"] = response_info(commit(rid, 400, k=ck))
    ev = EventCreateRequest(idempotency_key=ck, subject=Subject(tenant=p["tenant"]), action=ACTION,
                            actual=Amount(unit=Unit.USD_MICROCENTS, amount=250),
                            metadata={"note": "commit key reused on /v1/events"})
    out["event"] = response_info(client.create_event(ev))
    out["event_replay"] = response_info(client.create_event(ev))
    out["balances"] = response_info(client.get_balances(tenant=p["tenant"]))
elif case == "error_parse":
    # How the SDK itself parses one of our error bodies (budget 500, estimate 1000 -> 409).
    resp = create(amount=1000)
    out["create"] = response_info(resp)
    parsed = resp.get_error_response()
    out["parsed"] = parsed.model_dump(mode="json") if parsed is not None else None
    from runcycles import BudgetExceededError, cycles

    @cycles(estimate=1000, action_kind="llm.completion", action_name="error-parse", client=client)
    def guarded() -> None:
        raise AssertionError("must not run")

    try:
        guarded()
        out["exception"] = None
    except BudgetExceededError as exc:
        out["exception"] = {"request_id": exc.request_id, "error_code": exc.error_code, "details": exc.details}
elif case == "balances_no_filter":
    try:
        client.get_balances()
        out["raised"] = None
    except ValueError as exc:
        out["raised"] = {"type": type(exc).__name__, "message": str(exc)}
else:
    raise SystemExit(f"unknown case {case}")

client.close()
emit(out)
