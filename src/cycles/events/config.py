"""Settings of the derived-event analyzers: built-in defaults, overridable by one document
(kind "config", doc_id "analyzer", tenant "__system__") whose fields are the names below. A value of
the wrong type or out of range is ignored (the default stays) and logged once per load.

Durations are given in seconds (or ms where the name says so) and kept in ms; ratios are kept as
exact fractions (a float from JSON is read through its decimal text: 0.8 is 4/5, never 0.80000000000000004).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

log = logging.getLogger("cycles.events")

CONFIG_KIND = "config"
CONFIG_DOC_ID = "analyzer"

DEFAULT_THRESHOLDS = (Fraction(4, 5), Fraction(19, 20), Fraction(1))


def fraction(value: Any) -> Fraction | None:
    """An exact fraction of a JSON number (int, float through its shortest decimal text, or a
    decimal string); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return Fraction(repr(value))
    if isinstance(value, str):
        try:
            return Fraction(value.strip())
        except (ValueError, ZeroDivisionError):
            return None
    return None


@dataclass(slots=True)
class AnalyzerConfig:
    # budget.threshold_crossed
    threshold_interval_ms: int = 5_000
    default_thresholds: tuple[Fraction, ...] = DEFAULT_THRESHOLDS
    threshold_hysteresis: Fraction = Fraction(1, 20)  # re-arm below threshold - 5 percentage points
    utilization_basis: str = "spent"  # or "spent_plus_reserved"
    # budget.burn_rate_anomaly
    burn_rate_interval_ms: int = 15_000  # how often this process looks; a budget is sampled once per sample period
    burn_rate_sample_ms: int = 60_000
    burn_rate_window_ms: int = 300_000
    burn_rate_baseline_ms: int = 3_600_000
    burn_rate_min_history_ms: int = 900_000
    burn_rate_multiplier: Fraction = Fraction(3)
    burn_rate_min_per_minute: Fraction = Fraction(1)
    burn_rate_min_window_fraction: Fraction = Fraction(1, 100)
    burn_rate_cooldown_ms: int = 3_600_000
    # *_rate_spike
    rate_interval_ms: int = 15_000
    rate_window_ms: int = 300_000
    denial_spike_threshold: int = 50
    expiry_spike_threshold: int = 50
    auth_failure_spike_threshold: int = 20
    rate_scan_limit: int = 100_000
    # api_key.expired
    api_key_interval_ms: int = 30_000
    api_key_expiry_lookback_ms: int = 7 * 86_400_000
    # system.high_latency
    latency_threshold_ms: int = 1_000
    latency_cooldown_ms: int = 600_000
    # how long a loaded configuration is used before the document is read again
    config_ttl_ms: int = 10_000
    ignored: list[str] = field(default_factory=list)


# name in the document -> (attribute, kind, minimum, maximum); kinds: "s" seconds (kept in ms),
# "ms", "int", "frac", "fracs" (list of fractions in [0, 1]), "basis"
_FIELDS: dict[str, tuple[str, str, Any, Any]] = {
    "threshold_interval_seconds": ("threshold_interval_ms", "s", 1, 3600),
    "default_thresholds": ("default_thresholds", "fracs", 0, 1),
    "threshold_hysteresis": ("threshold_hysteresis", "frac", 0, 1),
    "utilization_basis": ("utilization_basis", "basis", None, None),
    "burn_rate_interval_seconds": ("burn_rate_interval_ms", "s", 1, 3600),
    "burn_rate_sample_seconds": ("burn_rate_sample_ms", "s", 10, 3600),
    "burn_rate_window_seconds": ("burn_rate_window_ms", "s", 60, 86_400),
    "burn_rate_baseline_seconds": ("burn_rate_baseline_ms", "s", 300, 7 * 86_400),
    "burn_rate_min_history_seconds": ("burn_rate_min_history_ms", "s", 60, 7 * 86_400),
    "burn_rate_multiplier": ("burn_rate_multiplier", "frac", Fraction(3, 2), 1_000_000),
    "burn_rate_min_per_minute": ("burn_rate_min_per_minute", "frac", 0, None),
    "burn_rate_min_window_fraction": ("burn_rate_min_window_fraction", "frac", 0, 1),
    "burn_rate_cooldown_seconds": ("burn_rate_cooldown_ms", "s", 60, 7 * 86_400),
    "rate_interval_seconds": ("rate_interval_ms", "s", 1, 3600),
    "rate_window_seconds": ("rate_window_ms", "s", 60, 86_400),
    "denial_spike_threshold": ("denial_spike_threshold", "int", 1, None),
    "expiry_spike_threshold": ("expiry_spike_threshold", "int", 1, None),
    "auth_failure_spike_threshold": ("auth_failure_spike_threshold", "int", 1, None),
    "rate_scan_limit": ("rate_scan_limit", "int", 1_000, None),
    "api_key_interval_seconds": ("api_key_interval_ms", "s", 1, 86_400),
    "api_key_expiry_lookback_seconds": ("api_key_expiry_lookback_ms", "s", 0, 3650 * 86_400),
    "latency_threshold_ms": ("latency_threshold_ms", "int", 1, None),
    "latency_cooldown_seconds": ("latency_cooldown_ms", "s", 1, 86_400),
    "config_ttl_seconds": ("config_ttl_ms", "s", 0, 3600),
}


def _in_range(value: Any, lo: Any, hi: Any) -> bool:
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def parse_config(doc: dict[str, Any] | None) -> AnalyzerConfig:
    cfg = AnalyzerConfig()
    for name, raw in (doc or {}).items():
        spec = _FIELDS.get(name)
        if spec is None:
            continue  # version, tenant bookkeeping, fields of later versions
        attr, kind, lo, hi = spec
        value: Any = None
        if kind in ("s", "int", "ms"):
            if isinstance(raw, int) and not isinstance(raw, bool) and _in_range(raw, lo, hi):
                value = raw * 1000 if kind == "s" else raw
        elif kind == "frac":
            f = fraction(raw)
            if f is not None and _in_range(f, lo, hi):
                value = f
        elif kind == "fracs":
            if isinstance(raw, list):
                items = [fraction(x) for x in raw]
                if all(f is not None and _in_range(f, lo, hi) for f in items):
                    value = tuple(sorted(set(items)))  # type: ignore[arg-type]
        elif kind == "basis":
            if raw in ("spent", "spent_plus_reserved"):
                value = raw
        if value is None:
            cfg.ignored.append(name)
        else:
            setattr(cfg, attr, value)
    if cfg.ignored:
        log.warning("analyzer config: ignoring invalid values of %s", ", ".join(sorted(cfg.ignored)))
    return cfg
