"""Per-subscription thresholds (WebhookThresholdConfig on a webhook subscription).

The analyzers evaluate every budget against the union of the thresholds of the subscriptions that
would receive its events (plus the server's default set), so one event is written per crossing and
threshold, whoever listens. `subscription_wants` then tells the dispatcher whether one subscription
asked for that particular event: a budget.threshold_crossed event goes only to subscriptions whose
`budget_utilization` list (default [0.8, 0.95, 1.0]) holds its threshold, a budget.burn_rate_anomaly
only to those whose `burn_rate_multiplier` (default 3.0) it reaches. Other events are unaffected.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Iterable

from ..webhooks import rules
from .config import DEFAULT_THRESHOLDS, fraction

THRESHOLD_EVENT = "budget.threshold_crossed"
BURN_EVENT = "budget.burn_rate_anomaly"
DEFAULT_MULTIPLIER = Fraction(3)


def sub_thresholds(sub: dict[str, Any]) -> tuple[Fraction, ...]:
    """A subscription's utilization thresholds (exact); the spec's default when it sets none."""
    cfg = sub.get("thresholds") or {}
    raw = cfg.get("budget_utilization") if isinstance(cfg, dict) else None
    if not isinstance(raw, list) or not raw:
        return DEFAULT_THRESHOLDS
    out = {f for f in (fraction(x) for x in raw) if f is not None and 0 <= f <= 1}
    return tuple(sorted(out)) or DEFAULT_THRESHOLDS


def sub_multiplier(sub: dict[str, Any]) -> Fraction:
    cfg = sub.get("thresholds") or {}
    f = fraction(cfg.get("burn_rate_multiplier")) if isinstance(cfg, dict) else None
    return f if f is not None and f >= Fraction(3, 2) else DEFAULT_MULTIPLIER


def listening(subs: Iterable[dict[str, Any]], event_type: str, tenant: str, scope: str) -> list[dict[str, Any]]:
    """Subscriptions (not DISABLED) that would receive `event_type` for this tenant and scope."""
    probe = {"event_type": event_type, "category": event_type.split(".", 1)[0], "tenant_id": tenant, "scope": scope}
    return [s for s in subs if s.get("status") != "DISABLED" and rules.wants(s, probe)]


def subscription_wants(sub: dict[str, Any], event: dict[str, Any]) -> bool:
    """Whether `sub`'s thresholds select this derived event (True for every other event type).
    Meant to be checked by the dispatcher after `rules.wants`."""
    data = event.get("data") or {}
    if event.get("event_type") == THRESHOLD_EVENT:
        t = fraction(data.get("threshold"))
        return t is None or t in sub_thresholds(sub)
    if event.get("event_type") == BURN_EVENT:
        m = fraction(data.get("multiplier"))
        return m is None or m >= sub_multiplier(sub)  # no multiplier: the baseline was zero
    return True
