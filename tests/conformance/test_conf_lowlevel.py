"""The low-level CyclesClient of runcycles 0.5.3 against our server (clients.md §8.2 A): error codes,
tenant isolation, idempotent replays and the separate commit / event key namespaces."""

from __future__ import annotations

from support import new_tenant

from .helpers import amounts, reservation


def assert_error(resp: dict, status: int, code: str) -> None:
    assert resp["status"] == status, resp
    assert resp["body"]["error"] == code, resp
    assert isinstance(resp["body"]["message"], str) and resp["body"]["message"]
    # the request id the SDK exposes is the one in the body
    assert resp["headers"]["x-request-id"] == resp["body"]["request_id"]


def test_wrong_api_key_is_401_unauthorized(sdk, tenant):
    tenant.budget("", 1_000_000)
    out = sdk.run("lowlevel", case="wrong_key")
    assert_error(out["create"], 401, "UNAUTHORIZED")
    assert_error(out["balances"], 401, "UNAUTHORIZED")
    assert amounts(tenant.balance(""))["reserved"] == 0


def test_other_tenants_reservation_is_403(sdk, tenant, server):
    tenant.budget("", 1_000_000)
    other = new_tenant(server)
    other.budget("", 1_000_000)
    out = sdk.run("lowlevel", case="foreign", other_api_key=other.key, other_tenant=other.tenant_id)

    assert out["create"]["status"] == 200
    rid = out["create"]["body"]["reservation_id"]
    for name in ("other_get", "other_commit", "other_release", "other_extend", "other_create_for_owner"):
        assert_error(out[name], 403, "FORBIDDEN")
    # the owner still sees its reservation untouched
    assert out["owner_get"]["status"] == 200 and out["owner_get"]["body"]["status"] == "ACTIVE"
    status, detail = reservation(tenant, rid)
    assert status == 200 and detail["status"] == "ACTIVE"
    assert amounts(tenant.balance(""))["reserved"] == 1000
    assert amounts(other.balance(""))["reserved"] == 0


def test_unknown_reservation_is_404(sdk, tenant):
    tenant.budget("", 1_000_000)
    out = sdk.run("lowlevel", case="unknown")
    for name in ("get", "commit", "release", "extend"):
        assert_error(out[name], 404, "NOT_FOUND")


def test_commit_in_another_unit_is_400_unit_mismatch(sdk, tenant):
    tenant.budget("", 1_000_000)
    out = sdk.run("lowlevel", case="unit_mismatch")
    assert_error(out["commit_tokens"], 400, "UNIT_MISMATCH")
    # the rejected commit changed nothing; a commit in the right unit still works
    assert out["get_after_mismatch"]["body"]["status"] == "ACTIVE"
    assert out["commit_usd"]["status"] == 200
    assert out["commit_usd"]["body"]["charged"] == {"unit": "USD_MICROCENTS", "amount": 700}
    assert amounts(tenant.balance(""))["spent"] == 700


def test_same_key_different_payload_is_409_idempotency_mismatch(sdk, tenant):
    tenant.budget("", 1_000_000)
    out = sdk.run("lowlevel", case="idem_mismatch")
    assert out["first"]["status"] == 200
    assert_error(out["second"], 409, "IDEMPOTENCY_MISMATCH")
    bal = amounts(tenant.balance(""))
    assert bal["reserved"] == 1000, "only the first create reserved anything"


def test_replays_return_the_original_answer(sdk, tenant):
    tenant.budget("", 1_000_000)
    out = sdk.run("lowlevel", case="replay")
    first, second = out["first"], out["second"]
    assert first["status"] == second["status"] == 200
    assert first["body"]["reservation_id"] == second["body"]["reservation_id"]
    # the same body, except the volatile remaining_ttl_ms (an observation at answer time)
    strip = lambda b: {k: v for k, v in b.items() if k != "remaining_ttl_ms"}  # noqa: E731
    assert strip(first["body"]) == strip(second["body"])
    assert "remaining_ttl_ms" in first["body"] and "remaining_ttl_ms" in second["body"]
    assert second["body"]["remaining_ttl_ms"] <= first["body"]["remaining_ttl_ms"]
    # the same commit twice: identical 200 bodies, charged once
    assert out["commit1"]["status"] == out["commit2"]["status"] == 200
    assert out["commit1"]["body"] == out["commit2"]["body"]
    # a new-key commit on a committed reservation
    assert_error(out["commit_new_key"], 409, "RESERVATION_FINALIZED")
    # the create replay after the commit still names the same reservation
    assert out["create_after_commit"]["status"] == 200
    assert out["create_after_commit"]["body"]["reservation_id"] == first["body"]["reservation_id"]
    listed = out["list_by_key"]["body"]["reservations"]
    assert [r["reservation_id"] for r in listed] == [first["body"]["reservation_id"]]
    bal = amounts(tenant.balance(""))
    assert bal["spent"] == 600 and bal["reserved"] == 0
    assert len(sdk.proxy.calls("POST", path="/v1/reservations")) == 3


def test_commit_key_reused_on_events_is_accepted(sdk, tenant):
    tenant.budget("", 1_000_000)
    out = sdk.run("lowlevel", case="commit_key_on_events")
    assert out["commit"]["status"] == 200
    assert out["event"]["status"] == 201, out["event"]
    assert out["event"]["body"]["status"] == "APPLIED"
    # a replay of the event is the original answer, not a second charge
    assert out["event_replay"]["status"] == 201
    assert out["event_replay"]["body"]["event_id"] == out["event"]["body"]["event_id"]
    commit_ex = sdk.proxy.calls("POST", suffix="/commit")[0]
    event_ex = sdk.proxy.calls("POST", path="/v1/events")[0]
    assert commit_ex.idempotency_key == event_ex.idempotency_key
    bal = amounts(tenant.balance(""))
    assert bal["spent"] == 400 + 250 and bal["reserved"] == 0


def test_get_balances_without_filter_fails_locally(sdk, tenant):
    out = sdk.run("lowlevel", case="balances_no_filter")
    assert out["raised"] is not None and out["raised"]["type"] == "ValueError"
    assert sdk.proxy.exchanges == []
