"""Helpers of the integration tests: expected prices straight from genai-prices, and what the server recorded."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN
from typing import Any

import pytest

from cycles.client import AsyncCyclesClient, CyclesConfig


def price_of(usage: dict[str, int], model: str, provider: str) -> int:
    """The committed amount the test expects, computed straight from genai-prices (not via cycles.pricing)."""
    import genai_prices

    total = genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id=provider).total_price
    return int((total * 100_000_000).to_integral_value(rounding=ROUND_HALF_EVEN))


def reservations(tenant, **query: Any) -> list[dict[str, Any]]:
    with tenant.client() as c:
        r = c.get("/v1/reservations", params={"tenant": tenant.tenant_id, "limit": 200,
                                               "include": "metadata,committed_metadata", **query})
    assert r.status_code == 200, r.text
    return r.json()["reservations"]


def only_reservation(tenant) -> dict[str, Any]:
    found = reservations(tenant)
    assert len(found) == 1, found
    return found[0]


def make_async_client(config: CyclesConfig) -> AsyncCyclesClient:
    return AsyncCyclesClient(config)



# The integrations are client code: their tests run against the session's SQLite server only (the server's
# behaviour on every store is what the rest of the suite checks), which keeps them inside their time budget.
ONE_STORE = pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
