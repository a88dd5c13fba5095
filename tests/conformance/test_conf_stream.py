"""stream_reservation with a caller-supplied idempotency key, sync and async (clients.md §1.7, §8.2 I)."""

from __future__ import annotations

import pytest

from .helpers import amounts, reservation

KEY = "chat-1"
ESTIMATE = 5000
TOKENS_PER_CHUNK = 100
PER_TOKEN = 10  # cost_fn = tokens_output * 10 -> 3 chunks * 100 tokens * 10 = 3000


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_stream_commit_uses_derived_key_and_cost_fn(sdk, tenant, flavour):
    tenant.budget("", 1_000_000)
    out = sdk.run("stream", mode=f"{flavour}_ok", key=KEY, estimate=ESTIMATE, tokens_per_chunk=TOKENS_PER_CHUNK,
                  per_output_token=PER_TOKEN)

    assert out["error"] is None and out["settlement_error"] is None, out
    rid = out["reservation_id"]
    assert sdk.proxy.summary() == [("POST", "/v1/reservations", 200),
                                   ("POST", "/v1/reservations/{id}/commit", 200)]
    create, commit = sdk.proxy.exchanges
    assert create.idempotency_key == KEY and create.request_headers["x-idempotency-key"] == KEY
    assert create.response_json["reservation_id"] == rid
    assert commit.path == f"/v1/reservations/{rid}/commit"
    assert commit.idempotency_key == f"commit-{KEY}"
    assert commit.request_headers["x-idempotency-key"] == f"commit-{KEY}"
    assert commit.request_json["actual"] == {"unit": "USD_MICROCENTS", "amount": 3 * TOKENS_PER_CHUNK * PER_TOKEN}
    assert commit.request_json["metrics"]["tokens_output"] == 3 * TOKENS_PER_CHUNK
    assert commit.request_json["metrics"]["tokens_input"] == 7
    assert commit.response_json["charged"]["amount"] == 3000
    assert commit.response_json["released"]["amount"] == ESTIMATE - 3000

    status, detail = reservation(tenant, rid)
    assert status == 200 and detail["status"] == "COMMITTED" and detail["committed"]["amount"] == 3000
    assert detail["idempotency_key"] == KEY
    bal = amounts(tenant.balance(""))
    assert bal["spent"] == 3000 and bal["reserved"] == 0
    assert out["journal_files"] == []


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_stream_exception_releases_with_derived_key(sdk, tenant, flavour):
    tenant.budget("", 1_000_000)
    out = sdk.run("stream", mode=f"{flavour}_fail", key=KEY, estimate=ESTIMATE, tokens_per_chunk=TOKENS_PER_CHUNK,
                  per_output_token=PER_TOKEN)

    assert out["error"]["type"] == "StreamBroke", out
    assert out["release_error"] is None
    rid = out["reservation_id"]
    assert sdk.proxy.summary() == [("POST", "/v1/reservations", 200),
                                   ("POST", "/v1/reservations/{id}/release", 200)]
    rel = sdk.proxy.exchanges[1]
    assert rel.path == f"/v1/reservations/{rid}/release"
    assert rel.idempotency_key == f"release-{KEY}"
    assert rel.request_headers["x-idempotency-key"] == f"release-{KEY}"
    assert rel.request_json["reason"] == "stream_failed"
    assert rel.response_json["released"] == {"unit": "USD_MICROCENTS", "amount": ESTIMATE}

    status, detail = reservation(tenant, rid)
    assert status == 200 and detail["status"] == "RELEASED"
    bal = amounts(tenant.balance(""))
    assert bal == {"allocated": 1_000_000, "spent": 0, "reserved": 0, "remaining": 1_000_000, "debt": 0}
    assert out["journal_files"] == []
