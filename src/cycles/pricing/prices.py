"""Price lookup (operator table -> genai-prices -> fallback -> error) and integer rounding."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Mapping

try:
    import genai_prices
    from genai_prices import data_snapshot
    from genai_prices.types import ModelPrice, Usage
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("cycles.pricing needs the genai-prices package: pip install 'cycles[pricing]'") from exc

MICROCENTS_PER_USD = 100_000_000  # 1 USD = 100 cents = 10^8 microcents
UNITS = ("USD_MICROCENTS", "TOKENS")
_PRICE_KEYS = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")


class UnknownModelError(LookupError):
    """No price for a model: not in the operator's table, not in genai-prices, and no fallback."""

    def __init__(self, model: str, provider: str | None) -> None:
        where = f"{provider}:{model}" if provider else model
        super().__init__(
            f"no price for model {where!r}: it is not in the operator price table nor in genai-prices "
            f"{genai_prices.__version__}. Add it to a PriceTable (e.g. {{\"{where}\": {{\"input_mtok\": \"3\", "
            "\"output_mtok\": \"15\"}}, USD per million tokens), set a fallback price, or use unit='TOKENS'")
        self.model = model
        self.provider = provider


def _decimal(value: Any, what: str) -> Decimal:
    # A float price would carry binary rounding into money: prices are given as str, int or Decimal.
    if isinstance(value, bool) or isinstance(value, float) or not isinstance(value, (str, int, Decimal)):
        raise ValueError(f"{what} must be a decimal string, int or Decimal (USD per million tokens), got {value!r}")
    try:
        d = Decimal(value)
    except ArithmeticError:
        raise ValueError(f"{what} is not a decimal number: {value!r}") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"{what} must be a finite non-negative number, got {value!r}")
    return d


@dataclass(frozen=True)
class Price:
    """An operator's price for one model, in USD per million tokens (cache prices optional: cached input
    tokens are charged at `input_mtok` when absent)."""

    input_mtok: Decimal
    output_mtok: Decimal
    cache_read_mtok: Decimal | None = None
    cache_write_mtok: Decimal | None = None

    @classmethod
    def of(cls, spec: "Price | Mapping[str, Any]", what: str = "price") -> "Price":
        if isinstance(spec, Price):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"{what}: expected a mapping of {', '.join(_PRICE_KEYS)}, got {spec!r}")
        unknown = set(spec) - set(_PRICE_KEYS)
        if unknown:
            raise ValueError(f"{what}: unknown keys {sorted(unknown)}; allowed: {', '.join(_PRICE_KEYS)}")
        for key in ("input_mtok", "output_mtok"):
            if key not in spec:
                raise ValueError(f"{what}: {key} is required")
        return cls(**{k: _decimal(spec[k], f"{what}.{k}") for k in _PRICE_KEYS if spec.get(k) is not None})

    def model_price(self) -> ModelPrice:
        return ModelPrice(input_mtok=self.input_mtok, output_mtok=self.output_mtok,
                          cache_read_mtok=self.cache_read_mtok, cache_write_mtok=self.cache_write_mtok)


class PriceTable:
    """Operator prices: `{"provider:model" or "model": Price}` for the deployment, optional per-tenant
    tables over it, and an optional fallback (a Price, or a model reference to price unknown models as).

    File form (JSON or YAML, `CYCLES_PRICE_TABLE=path`)::

        models:   {"openai:ft:gpt-4o:acme": {input_mtok: "3.75", output_mtok: "15"}}
        tenants:  {acme: {"anthropic:claude-sonnet-4-5": {input_mtok: "2.7", output_mtok: "13.5"}}}
        fallback: "openai:gpt-4o"      # or {input_mtok: ..., output_mtok: ...}; absent = unknown models raise
    """

    def __init__(self, models: Mapping[str, Any] | None = None, *, tenants: Mapping[str, Mapping[str, Any]] | None = None,
                 fallback: "Price | Mapping[str, Any] | str | None" = None) -> None:
        self.models = {self._key(k): Price.of(v, f"price of {k}") for k, v in (models or {}).items()}
        self.tenants = {t: {self._key(k): Price.of(v, f"price of {k} for tenant {t}") for k, v in table.items()}
                        for t, table in (tenants or {}).items()}
        if fallback is None or isinstance(fallback, str):
            self.fallback: Price | str | None = fallback
        else:
            self.fallback = Price.of(fallback, "fallback price")

    @staticmethod
    def _key(key: str) -> str:
        if not isinstance(key, str) or not key:
            raise ValueError(f"a price table key is 'provider:model' or 'model', got {key!r}")
        return key.lower()

    def find(self, model: str, provider: str | None, tenant: str | None = None) -> Price | None:
        keys = ([f"{provider}:{model}".lower()] if provider else []) + [model.lower()]
        for table in ([self.tenants[tenant]] if tenant in self.tenants else []) + [self.models]:
            for key in keys:
                if key in table:
                    return table[key]
        return None

    @classmethod
    def from_file(cls, path: str | Path) -> "PriceTable":
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        if not isinstance(raw, dict) or set(raw) - {"models", "tenants", "fallback"}:
            raise ValueError(f"{path}: a price table has only the keys models, tenants, fallback")
        return cls(raw.get("models"), tenants=raw.get("tenants"), fallback=raw.get("fallback"))


def usd_to_microcents(usd: Decimal, *, up: bool) -> int:
    """USD -> integer USD_MICROCENTS: `up=True` rounds toward +inf (reservations), else to nearest, ties even."""
    return int((usd * MICROCENTS_PER_USD).to_integral_value(rounding=ROUND_CEILING if up else ROUND_HALF_EVEN))


def _usage(usage: Any) -> Usage:
    return usage if isinstance(usage, Usage) else Usage.from_raw(usage)


def _split_ref(model: str, provider: str | None) -> tuple[str, str | None]:
    if provider is None and ":" in model:
        head, _, tail = model.partition(":")
        if data_snapshot.find_provider_by_id(data_snapshot.get_snapshot().providers, head) is not None:
            return tail, head
    return model, provider


class Pricer:
    """Integer amounts of LLM calls in one unit.

    `estimate(...)` prices the upper bound of a request (input tokens bounded, output = its max tokens),
    rounded up; `actual(usage, ...)` prices the provider's usage, rounded to nearest. In `TOKENS` the amount
    is input + output tokens (cache reads/writes are input tokens) and no price is needed.
    """

    def __init__(self, unit: str = "USD_MICROCENTS", *, table: PriceTable | Mapping[str, Any] | None = None,
                 fallback: "Price | Mapping[str, Any] | str | None" = None) -> None:
        unit = getattr(unit, "value", unit)
        if unit not in UNITS:
            raise ValueError(f"pricing unit must be one of {', '.join(UNITS)}, got {unit!r}")
        self.unit = unit
        self.table = table if isinstance(table, PriceTable) else PriceTable(table or {})
        self.fallback = self.table.fallback if fallback is None else (
            fallback if isinstance(fallback, str) else Price.of(fallback, "fallback price"))
        self._cache: dict[tuple[str, str | None, str | None], tuple[Any, Any, str]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lookup

    def source(self, model: str, provider: str | None = None, *, tenant: str | None = None) -> str:
        """Where this model's price comes from: "table", "genai-prices", "fallback" (or "tokens");
        raises UnknownModelError when nowhere."""
        if self.unit == "TOKENS":
            return "tokens"
        return self._lookup(model, provider, tenant)[2]

    def _lookup(self, model: str, provider: str | None, tenant: str | None) -> tuple[Any, Any, str]:
        key = (model, provider, tenant)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        found = self._resolve(model, provider, tenant)
        with self._lock:
            self._cache[key] = found
        return found

    def _resolve(self, model: str, provider: str | None, tenant: str | None) -> tuple[Any, Any, str]:
        if not isinstance(model, str) or not model:
            raise UnknownModelError(str(model), provider)
        own = self.table.find(model, provider, tenant)
        if own is not None:
            return None, own.model_price(), "table"
        found = self._genai(model, provider)
        if found is not None:
            return found[0], found[1], "genai-prices"
        if isinstance(self.fallback, Price):
            return None, self.fallback.model_price(), "fallback"
        if isinstance(self.fallback, str):
            ref, prov = _split_ref(self.fallback, None)
            found = self._genai(ref, prov)
            if found is None:
                raise ValueError(f"the fallback model {self.fallback!r} is not in genai-prices")
            return found[0], found[1], "fallback"
        raise UnknownModelError(model, provider)

    @staticmethod
    def _genai(model: str, provider: str | None) -> tuple[Any, Any] | None:
        snap = data_snapshot.get_snapshot()
        model, provider = _split_ref(model, provider)
        for prov in ([provider, None] if provider else [None]):
            try:
                p, info = snap.find_provider_model(model, None, prov, None)
            except LookupError:
                continue
            return p, info
        return None

    # ------------------------------------------------------------------ amounts

    def usd(self, usage: Any, model: str, provider: str | None = None, *, tenant: str | None = None,
            context: Mapping[str, str] | None = None) -> Decimal:
        """Exact USD cost (Decimal) of `usage` (a genai_prices.Usage or anything with its fields)."""
        prov, price, _ = self._lookup(model, provider, tenant)
        u = _usage(usage)
        if prov is None:
            return price.calc_price(u)["total_price"]
        return price.calc_price(u, prov, price_context=context or None).total_price

    def actual(self, usage: Any, model: str, provider: str | None = None, *, tenant: str | None = None,
               context: Mapping[str, str] | None = None) -> int:
        """Priced actual of a call, rounded to the nearest unit (ties to even)."""
        u = _usage(usage)
        if self.unit == "TOKENS":
            return int(u.input_tokens) + int(u.output_tokens)
        return usd_to_microcents(self.usd(u, model, provider, tenant=tenant, context=context), up=False)

    def estimate(self, model: str, provider: str | None = None, *, input_tokens: int, output_tokens: int,
                 tenant: str | None = None, context: Mapping[str, str] | None = None) -> int:
        """Upper-bound amount of a request, rounded up. Raises UnknownModelError (before anything is
        reserved) when the model has no price and no fallback is set."""
        for n, what in ((input_tokens, "input_tokens"), (output_tokens, "output_tokens")):
            if type(n) is not int or n < 0:
                raise ValueError(f"{what} must be a non-negative int, got {n!r}")
        if self.unit == "TOKENS":
            return input_tokens + output_tokens
        usd = self.usd(Usage(input_tokens=input_tokens, output_tokens=output_tokens), model, provider,
                       tenant=tenant, context=context)
        return usd_to_microcents(usd, up=True)


_default: Pricer | None = None
_default_lock = threading.Lock()


def default_pricer() -> Pricer:
    """The process-wide USD_MICROCENTS pricer: genai-prices, under the table named by CYCLES_PRICE_TABLE."""
    global _default
    with _default_lock:
        if _default is None:
            path = os.environ.get("CYCLES_PRICE_TABLE")
            _default = Pricer(table=PriceTable.from_file(path) if path else None)
        return _default


__all__ = ["Price", "PriceTable", "Pricer", "UnknownModelError", "default_pricer", "usd_to_microcents",
           "MICROCENTS_PER_USD"]
