"""Checks of the runtime operations: the lifecycle, idempotent settlement, error codes, units, TTL/grace/extend
and overdraft. Each measures on the wire; none trusts what the server says about itself."""

from __future__ import annotations

import time
from typing import Callable

from .probe import NA, OTHER_UNIT, UNIT, UNTESTED, Context, Untestable, amount_of, key, reserve_body

CHECKS: list[tuple[str, str, Callable[[Context], None]]] = []


def check(group: str):
    def wrap(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        CHECKS.append((group, fn.__name__, fn))
        return fn
    return wrap


def _reserve(ctx: Context, subject: dict, amount: int, **extra) -> tuple[dict, object]:
    body = reserve_body(subject, amount, **extra)
    ex = ctx.call("POST", "/v1/reservations", json_body=body)
    return body, ex


@check("operations")
def lifecycle(ctx: Context) -> None:
    """Reserve, commit and release through the spec's paths; balances move by exactly what was settled."""
    subject = ctx.subject_for("life", 1_000_000, 30)
    before = ctx.balance(subject)
    _, ex = _reserve(ctx, subject, 20)
    if not ctx.expect("createReservation", ex, 200, what="reserve 20 within budget"):
        raise Untestable("reserve failed; the lifecycle cannot continue")
    body = ex.body
    if body.get("decision") not in ("ALLOW", "ALLOW_WITH_CAPS") or not body.get("reservation_id"):
        ctx.fail("createReservation", "an ALLOW reservation carries decision and reservation_id", ex,
                 "decision=ALLOW and a reservation_id")
        return
    rid = body["reservation_id"]
    held = ctx.balance(subject)
    if amount_of(held, "reserved") - amount_of(before, "reserved") != 20:
        ctx.fail("createReservation", f"reserved moved by {amount_of(held, 'reserved') - amount_of(before, 'reserved')}"
                 ", not the 20 reserved")
    ex = ctx.call("POST", f"/v1/reservations/{rid}/commit", json_body={"idempotency_key": key(),
                                                                        "actual": {"unit": UNIT, "amount": 7}})
    if ctx.expect("commitReservation", ex, 200, what="commit 7 of 20"):
        after = ctx.balance(subject)
        spent = amount_of(after, "spent") - amount_of(before, "spent")
        reserved = amount_of(after, "reserved") - amount_of(before, "reserved")
        if spent != 7 or reserved != 0:
            ctx.fail("commitReservation", f"after commit of 7: spent moved by {spent}, reserved by {reserved} "
                     "(expected 7 and 0)")
    _, ex = _reserve(ctx, subject, 10)
    if ex.status == 200:
        rid2 = ex.body["reservation_id"]
        ex = ctx.call("POST", f"/v1/reservations/{rid2}/release", json_body={"idempotency_key": key()})
        if ctx.expect("releaseReservation", ex, 200, what="release"):
            after = ctx.balance(subject)
            if amount_of(after, "reserved") != amount_of(before, "reserved"):
                ctx.fail("releaseReservation", "release did not return the held amount to the budget")
    ex = ctx.call("GET", "/v1/balances", params={"tenant": subject["tenant"]})
    ctx.expect("getBalances", ex, 200, what="GET /v1/balances")


@check("idempotency")
def idempotent_settlement(ctx: Context) -> None:
    """Same-key replays of reserve, commit and release answer the original bytes and settle once."""
    subject = ctx.subject_for("idem", 1_000_000, 30)
    body, ex = _reserve(ctx, subject, 20)
    if ex.status != 200:
        raise Untestable(f"reserve answered {ex.status}")
    replay = ctx.call("POST", "/v1/reservations", json_body=body)
    volatile = ("remaining_ttl_ms",)
    first = {k: v for k, v in ex.body.items() if k not in volatile}
    again = {k: v for k, v in (replay.body or {}).items() if k not in volatile}
    if replay.status != 200 or first != again:
        ctx.fail("Idempotent commit and release", "a same-key reserve replay did not return the original outcome",
                 replay, f"HTTP 200 with {first}")
    else:
        ctx.ok("Idempotent commit and release", "reserve replay returned the original reservation_id")
    rid = ex.body["reservation_id"]
    before = ctx.balance(subject)
    commit = {"idempotency_key": key(), "actual": {"unit": UNIT, "amount": 9}}
    c1 = ctx.call("POST", f"/v1/reservations/{rid}/commit", json_body=commit)
    if c1.status != 200:
        raise Untestable(f"commit answered {c1.status}")
    c2 = ctx.call("POST", f"/v1/reservations/{rid}/commit", json_body=commit)
    after = ctx.balance(subject)
    if c2.status != 200 or c2.content != c1.content:
        ctx.fail("Idempotent commit and release", "a same-key commit replay is not byte-identical to the original",
                 c2, f"HTTP 200 with body {c1.content.decode()[:500]}")
    charged = amount_of(after, "spent") - amount_of(before, "spent")
    if charged != 9:
        ctx.fail("Idempotent commit and release", f"commit of 9 replayed once charged {charged} in total", c2,
                 "spent to move by 9 exactly once")
    else:
        ctx.ok("Idempotent commit and release", "commit replay byte-identical, charged once")
    mismatch = dict(commit, actual={"unit": UNIT, "amount": 10})
    ex = ctx.call("POST", f"/v1/reservations/{rid}/commit", json_body=mismatch)
    ctx.expect("IDEMPOTENCY_MISMATCH", ex, 409, "IDEMPOTENCY_MISMATCH", "same key, different commit payload")
    ex = ctx.call("POST", "/v1/reservations", json_body=dict(body, estimate={"unit": UNIT, "amount": 21}))
    ctx.expect("IDEMPOTENCY_MISMATCH", ex, 409, "IDEMPOTENCY_MISMATCH", "same key, different reserve payload")
    _, ex = _reserve(ctx, subject, 5)
    if ex.status == 200:
        rid2 = ex.body["reservation_id"]
        rel = {"idempotency_key": key()}
        r1 = ctx.call("POST", f"/v1/reservations/{rid2}/release", json_body=rel)
        r2 = ctx.call("POST", f"/v1/reservations/{rid2}/release", json_body=rel)
        if r1.status != 200 or r2.status != 200 or r1.content != r2.content:
            ctx.fail("Idempotent commit and release", "a same-key release replay is not byte-identical", r2,
                     f"HTTP 200 with body {r1.content.decode()[:500]}")
        else:
            ctx.ok("Idempotent commit and release", "release replay byte-identical")


@check("errors")
def error_codes(ctx: Context) -> None:
    """Finalized, unknown and over-budget requests get the spec's status and error code."""
    subject = ctx.subject_for("errs", 100, 10)
    _, ex = _reserve(ctx, subject, 3)
    if ex.status == 200:
        rid = ex.body["reservation_id"]
        ctx.call("POST", f"/v1/reservations/{rid}/release", json_body={"idempotency_key": key()})
        ex = ctx.call("POST", f"/v1/reservations/{rid}/commit",
                      json_body={"idempotency_key": key(), "actual": {"unit": UNIT, "amount": 1}})
        ctx.expect("RESERVATION_FINALIZED", ex, 409, "RESERVATION_FINALIZED", "commit after release")
        ex = ctx.call("POST", f"/v1/reservations/{rid}/release", json_body={"idempotency_key": key()})
        ctx.expect("RESERVATION_FINALIZED", ex, 409, "RESERVATION_FINALIZED", "release (new key) after release")
    ghost = f"conformance-missing-{key()}"
    for op, payload in (("commit", {"idempotency_key": key(), "actual": {"unit": UNIT, "amount": 1}}),
                        ("release", {"idempotency_key": key()}),
                        ("extend", {"idempotency_key": key(), "extend_by_ms": 1000})):
        ex = ctx.call("POST", f"/v1/reservations/{ghost}/{op}", json_body=payload)
        ctx.expect("NOT_FOUND", ex, 404, "NOT_FOUND", f"{op} of a reservation that never existed")
    ex = ctx.call("GET", f"/v1/reservations/{ghost}")
    if ex.status not in (404, 405) or (ex.status == 404 and ex.error != "NOT_FOUND"):
        ctx.fail("NOT_FOUND", "GET of a reservation that never existed", ex, "HTTP 404 error=NOT_FOUND")
    if ctx.provisioned:
        _, ex = _reserve(ctx, subject, 101)
        ctx.expect("BUDGET_EXCEEDED", ex, 409, "BUDGET_EXCEEDED", "reserve 101 against a budget of 100")
    else:
        ctx.record("BUDGET_EXCEEDED", "could_not_test", "needs --admin-key to create a budget it may exhaust")


@check("units")
def unit_consistency(ctx: Context) -> None:
    """A wrong unit on reserve or commit is 400 UNIT_MISMATCH and moves nothing."""
    subject = ctx.subject_for("units", 1_000, 10)
    before = ctx.balance(subject)
    _, ex = _reserve(ctx, subject, 5, unit=OTHER_UNIT)
    ctx.expect("UNIT_MISMATCH", ex, 400, "UNIT_MISMATCH", f"reserve in {OTHER_UNIT} against a {UNIT} budget")
    _, ex = _reserve(ctx, subject, 5)
    if ex.status != 200:
        raise Untestable(f"reserve answered {ex.status}")
    rid = ex.body["reservation_id"]
    ex = ctx.call("POST", f"/v1/reservations/{rid}/commit",
                  json_body={"idempotency_key": key(), "actual": {"unit": OTHER_UNIT, "amount": 1}})
    ok = ctx.expect("UNIT_MISMATCH", ex, 400, "UNIT_MISMATCH", "commit in another unit than the estimate")
    ctx.call("POST", f"/v1/reservations/{rid}/release", json_body={"idempotency_key": key()})
    after = ctx.balance(subject)
    if amount_of(after, "spent") != amount_of(before, "spent") or amount_of(after, "reserved") != amount_of(
            before, "reserved"):
        ctx.fail("Unit consistency", "a rejected wrong-unit request changed the balance")
    elif ok:
        ctx.ok("Unit consistency", "wrong units rejected, balances untouched")


@check("ttl")
def ttl_grace_extend(ctx: Context) -> None:
    """Extend moves expiry; commit is accepted in the grace window and refused after it; expiry frees budget."""
    subject = ctx.subject_for("ttl", 1_000_000, 40)
    base = ctx.balance(subject)
    # extended first and at once, so even a slow server answers the extend inside the 1 s lease
    _, ex = _reserve(ctx, subject, 10, ttl_ms=1000, grace_period_ms=0)
    if ex.status != 200:
        raise Untestable(f"reserve with ttl_ms=1000 answered {ex.status}")
    extended, first_expiry = ex.body["reservation_id"], ex.body.get("expires_at_ms")
    ex = ctx.call("POST", f"/v1/reservations/{extended}/extend", json_body={"idempotency_key": key(),
                                                                             "extend_by_ms": 5000})
    if ctx.expect("extendReservation", ex, 200, what="extend by 5000 ms"):
        new_expiry = (ex.body or {}).get("expires_at_ms")
        if not isinstance(first_expiry, int) or new_expiry != first_expiry + 5000:
            ctx.fail("extendReservation", f"expires_at_ms went {first_expiry} → {new_expiry}, expected +5000", ex,
                     "expires_at_ms increased by extend_by_ms")
    _, ex = _reserve(ctx, subject, 10, ttl_ms=1000, grace_period_ms=5000)  # committed inside grace
    graced = ex.body["reservation_id"] if ex.status == 200 else None
    _, ex = _reserve(ctx, subject, 10, ttl_ms=1000, grace_period_ms=0)  # expires untouched
    lapsing = ex.body["reservation_id"] if ex.status == 200 else None
    if not (lapsing and graced):
        raise Untestable(f"reserve with ttl_ms=1000 answered {ex.status}")
    time.sleep(1.35)  # past every original expiry: the last reservation was made just now
    ex = ctx.call("POST", f"/v1/reservations/{graced}/commit",
                  json_body={"idempotency_key": key(), "actual": {"unit": UNIT, "amount": 4}})
    ctx.expect("commits are accepted through", ex, 200, what="commit after expiry, inside a 5000 ms grace")
    ex = ctx.call("POST", f"/v1/reservations/{extended}/commit",
                  json_body={"idempotency_key": key(), "actual": {"unit": UNIT, "amount": 3}})
    ctx.expect("extendReservation", ex, 200, what="commit after the original TTL, inside the extended one")
    ex = ctx.call("POST", f"/v1/reservations/{lapsing}/commit",
                  json_body={"idempotency_key": key(), "actual": {"unit": UNIT, "amount": 1}})
    ctx.expect("RESERVATION_EXPIRED", ex, 410, "RESERVATION_EXPIRED", "commit after expiry with grace 0")
    ex = ctx.call("POST", f"/v1/reservations/{lapsing}/extend", json_body={"idempotency_key": key(),
                                                                            "extend_by_ms": 1000})
    ctx.expect("RESERVATION_EXPIRED", ex, 410, "RESERVATION_EXPIRED", "extend after expiry")
    deadline = time.monotonic() + 10
    while True:
        now = ctx.balance(subject)
        held = amount_of(now, "reserved") - amount_of(base, "reserved")
        if held == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if held == 0:
        ctx.ok("an expired reservation returns its budget", "reserved back to its starting value after expiry")
    else:
        ctx.fail("an expired reservation returns its budget", f"{held} still reserved 10 s after the only open "
                 "reservation expired")


@check("overdraft")
def overdraft_and_debt(ctx: Context) -> None:
    """ALLOW_WITH_OVERDRAFT commits may go into debt up to the limit; beyond it 409 OVERDRAFT_LIMIT_EXCEEDED;
    with debt outstanding a new reservation is 409 DEBT_OUTSTANDING."""
    subject = ctx.budget("debt", 100, overdraft_limit=50)
    _, ex = _reserve(ctx, subject, 90, overage_policy="ALLOW_WITH_OVERDRAFT")
    if ex.status != 200:
        raise Untestable(f"reserve with overage_policy=ALLOW_WITH_OVERDRAFT answered {ex.status}")
    rid = ex.body["reservation_id"]
    ex = ctx.call("POST", f"/v1/reservations/{rid}/commit",
                  json_body={"idempotency_key": key(), "actual": {"unit": UNIT, "amount": 200}})
    ctx.expect("OVERDRAFT_LIMIT_EXCEEDED", ex, 409, "OVERDRAFT_LIMIT_EXCEEDED",
               "commit 200 against 100 allocated + 50 overdraft")
    ex = ctx.call("POST", f"/v1/reservations/{rid}/commit",
                  json_body={"idempotency_key": key(), "actual": {"unit": UNIT, "amount": 120}})
    if ex.status != 200:
        raise Untestable(f"commit into overdraft (120 of 100 + 50) answered {ex.status}")
    _, ex = _reserve(ctx, subject, 1)
    if ex.status < 300:
        ctx.fail("DEBT_OUTSTANDING", "a reservation was allowed on a scope in debt with nothing remaining", ex,
                 "a 409 refusal")
    # DEBT_OUTSTANDING is "debt > 0 and overdraft_limit == 0" (ReasonCode); the reference admin surface reaches
    # it by lowering the limit, which may instead put the scope over its limit (then over-limit wins).
    scope = "/".join(f"{k}:{v}" for k, v in subject.items())
    ex = ctx.call("PATCH", "/v1/admin/budgets", key="admin", params={"scope": scope, "unit": UNIT},
                  json_body={"overdraft_limit": {"unit": UNIT, "amount": 0}}, validate=False)
    if ex.status != 200:
        ctx.record("DEBT_OUTSTANDING", UNTESTED, f"lowering overdraft_limit to 0 (PATCH /v1/admin/budgets) answered "
                   f"{ex.status}; the state debt > 0 with overdraft_limit == 0 is not reachable from here")
        return
    over = bool(ctx.balance(subject).get("is_over_limit"))
    _, ex = _reserve(ctx, subject, 1)
    if over:
        ctx.expect("OVERDRAFT_LIMIT_EXCEEDED", ex, 409, "OVERDRAFT_LIMIT_EXCEEDED",
                   "reserve on an over-limit scope that also has debt (over-limit takes precedence)")
        ctx.record("DEBT_OUTSTANDING", NA, "this server puts a scope with debt over its limit when overdraft_limit "
                   "drops to 0, so the DEBT_OUTSTANDING state (debt > 0, overdraft_limit == 0, not over-limit) "
                   "never arises through its API")
    else:
        ctx.expect("DEBT_OUTSTANDING", ex, 409, "DEBT_OUTSTANDING", "reserve with debt 20 and overdraft_limit 0")
