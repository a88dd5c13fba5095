"""cycles.pricing: integer amounts from genai-prices, rounding, operator tables, the unknown-model rule."""

from __future__ import annotations

from decimal import Decimal

import genai_prices
import pytest
from genai_prices import Usage

from cycles.pricing import Pricer, PriceTable, UnknownModelError, prompt_token_bound, usd_to_microcents
from cycles.pricing.tokens import IMAGE_TOKEN_BOUND


def test_rounding_up_for_reservations_nearest_even_for_commits():
    assert usd_to_microcents(Decimal("0.000000011"), up=True) == 2  # 1.1 microcents
    assert usd_to_microcents(Decimal("0.000000011"), up=False) == 1
    assert usd_to_microcents(Decimal("0.000000025"), up=False) == 2  # tie -> even
    assert usd_to_microcents(Decimal("0.000000035"), up=False) == 4
    assert usd_to_microcents(Decimal("0.000000030"), up=True) == 3  # exact stays exact


def test_actual_matches_genai_prices_and_estimate_is_rounded_up():
    p = Pricer()
    u = Usage(input_tokens=1234, output_tokens=567, cache_read_tokens=89)
    exact = genai_prices.calc_price(u, "claude-sonnet-4-5", provider_id="anthropic").total_price
    assert p.actual(u, "claude-sonnet-4-5", "anthropic") == usd_to_microcents(exact, up=False)
    # 1 input token of gpt-4o-mini at $0.15/M = $1.5e-7 = 15 microcents, exactly
    assert p.estimate("gpt-4o-mini", "openai", input_tokens=1, output_tokens=0) == 15
    tiny = Pricer(table={"tiny": {"input_mtok": "0.001", "output_mtok": "0.001"}})  # 3 tokens: 0.3 microcents
    assert tiny.estimate("tiny", None, input_tokens=3, output_tokens=0) == 1
    assert tiny.actual(Usage(input_tokens=3, output_tokens=0), "tiny") == 0
    assert type(p.estimate("gpt-4o-mini", "openai", input_tokens=10**6, output_tokens=10**6)) is int


def test_table_tenant_and_precedence():
    table = PriceTable({"openai:gpt-4o": {"input_mtok": "1", "output_mtok": "2"}, "my-model": {"input_mtok": 3,
                                                                                               "output_mtok": 4}},
                       tenants={"acme": {"gpt-4o": {"input_mtok": "0.5", "output_mtok": "1"}}})
    p = Pricer(table=table)
    assert p.estimate("gpt-4o", "openai", input_tokens=10**6, output_tokens=0) == 100_000_000  # $1
    assert p.estimate("gpt-4o", "openai", input_tokens=10**6, output_tokens=0, tenant="acme") == 50_000_000
    assert p.source("my-model", "vllm") == "table" and p.source("gpt-4o-mini", "openai") == "genai-prices"


def test_unknown_model_is_an_error_unless_a_fallback_is_set():
    with pytest.raises(UnknownModelError, match="no price for model 'vllm:llama-local'"):
        Pricer().estimate("llama-local", "vllm", input_tokens=1, output_tokens=1)
    by_ref = Pricer(fallback="openai:gpt-4o")
    assert by_ref.source("llama-local", "vllm") == "fallback"
    assert by_ref.estimate("llama-local", "vllm", input_tokens=10**6, output_tokens=0) == \
        Pricer().estimate("gpt-4o", "openai", input_tokens=10**6, output_tokens=0)
    by_price = Pricer(fallback={"input_mtok": "2", "output_mtok": "8"})
    assert by_price.actual(Usage(input_tokens=10**6, output_tokens=10**6), "x", None) == 1_000_000_000


def test_bad_prices_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="decimal string"):
        PriceTable({"m": {"input_mtok": 0.1, "output_mtok": "1"}})  # a float
    with pytest.raises(ValueError, match="output_mtok is required"):
        PriceTable({"m": {"input_mtok": "1"}})
    with pytest.raises(ValueError, match="unknown keys"):
        PriceTable({"m": {"input_mtok": "1", "output_mtok": "1", "per_image": "3"}})
    with pytest.raises(ValueError, match="non-negative"):
        PriceTable({"m": {"input_mtok": "-1", "output_mtok": "1"}})
    with pytest.raises(ValueError, match="pricing unit"):
        Pricer("CREDITS")


def test_tokens_unit_needs_no_price():
    p = Pricer("TOKENS")
    assert p.estimate("anything", None, input_tokens=100, output_tokens=50) == 150
    assert p.actual(Usage(input_tokens=100, output_tokens=7, cache_read_tokens=40), "anything") == 107


def test_prompt_bound_is_an_upper_bound_and_counts_images():
    text = "Budgets are enforced before the call. " * 20
    assert prompt_token_bound([{"role": "user", "content": text}]) >= len(text.encode())
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    bound = prompt_token_bound([{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}])
    assert IMAGE_TOKEN_BOUND <= bound < IMAGE_TOKEN_BOUND + 200
