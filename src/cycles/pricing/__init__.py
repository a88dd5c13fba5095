"""`cycles.pricing`: the cost of an LLM call as an integer amount in a Cycles unit.

Prices come from `genai-prices` (pydantic's maintained price data, bundled and offline), overridden per
deployment by an operator's `PriceTable`. Amounts are integers: `USD_MICROCENTS` (1 USD = 10^8) or
`TOKENS`. An estimate (before the call) is rounded UP, a priced actual (after it) to the NEAREST unit
(ties to even). A model found nowhere raises `UnknownModelError` unless a fallback price is configured:
never a silent 0. See docs/integrations.md.
"""

from .prices import (MICROCENTS_PER_USD, Price, PriceTable, Pricer, UnknownModelError, default_pricer,
                     usd_to_microcents)
from .tokens import IMAGE_TOKEN_BOUND, prompt_token_bound

__all__ = ["Price", "PriceTable", "Pricer", "UnknownModelError", "default_pricer", "usd_to_microcents",
           "MICROCENTS_PER_USD", "prompt_token_bound", "IMAGE_TOKEN_BOUND"]
