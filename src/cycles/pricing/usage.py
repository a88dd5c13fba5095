"""Usage from a provider's own response body, read by genai-prices' maintained extractors."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from genai_prices import data_snapshot
from genai_prices.types import Usage


@lru_cache(maxsize=None)
def _provider(provider_id: str) -> Any:
    p = data_snapshot.find_provider_by_id(data_snapshot.get_snapshot().providers, provider_id)
    if p is None:
        raise LookupError(f"genai-prices has no provider {provider_id!r}")
    return p


def extract_usage(body: Any, provider_id: str, api_flavor: str = "default") -> Usage:
    """`body` is the response (or a dict with `model` and `usage` in the provider's shape): the usage it
    reports, whether or not the model is known (pricing is a separate step)."""
    if hasattr(body, "model_dump"):
        body = body.model_dump(mode="json", exclude_none=True)
    _, usage = _provider(provider_id).extract_usage(body, api_flavor=api_flavor)
    return usage


__all__ = ["extract_usage", "Usage"]
