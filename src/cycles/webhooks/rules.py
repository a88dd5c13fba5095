"""The two WEBHOOK SUBSCRIPTION INVARIANTS and event matching: one implementation used by every
write path and again, fail closed, by the dispatcher for every event it would deliver."""

from __future__ import annotations

from typing import Any, Iterable

from ..core.events import CATEGORIES, EVENT_TYPES, SYSTEM_TENANT, TENANT_CATEGORIES


class InvariantViolation(ValueError):
    pass


def check_selectors(owner: str, event_types: Iterable[str] | None, event_categories: Iterable[str] | None) -> None:
    """INVARIANT 1 (at least one selector) and INVARIANT 2 (a concrete tenant's subscription selects
    only budget / reservation / tenant events). Raises InvariantViolation with the reason."""
    types, categories = list(event_types or ()), list(event_categories or ())
    if not types and not categories:
        raise InvariantViolation("a subscription needs at least one of event_types or event_categories")
    for t in types:
        if t not in EVENT_TYPES and not t.startswith("custom."):
            raise InvariantViolation(f"unknown event type {t!r}")
    for c in categories:
        if c not in CATEGORIES:
            raise InvariantViolation(f"unknown event category {c!r}")
    if owner != SYSTEM_TENANT:
        bad_types = [t for t in types if t.split(".", 1)[0] not in TENANT_CATEGORIES]
        bad_cats = [c for c in categories if c not in TENANT_CATEGORIES]
        if bad_types or bad_cats:
            raise InvariantViolation(
                "a tenant's subscription may select only budget, reservation and tenant events; "
                f"not {', '.join(bad_types + bad_cats)}")


def scope_matches(scope_filter: str | None, scope: str | None) -> bool:
    """Exact, or a trailing `*` prefix; no filter matches all; an event without scope never matches a filter."""
    if not scope_filter:
        return True
    if not scope:
        return False
    if scope_filter.endswith("*"):
        return scope.startswith(scope_filter[:-1])
    return scope == scope_filter


def wants(sub: dict[str, Any], event: dict[str, Any]) -> bool:
    """Whether a subscription should receive an event. Fails closed: a subscription whose stored
    selectors break the invariants receives nothing, and a tenant's subscription never receives an
    event of another tenant or of an operator-only category."""
    owner = sub.get("tenant_id")
    try:
        check_selectors(owner, sub.get("event_types"), sub.get("event_categories"))
    except InvariantViolation:
        return False
    if owner != SYSTEM_TENANT:
        if event.get("tenant_id") != owner or event.get("category") not in TENANT_CATEGORIES:
            return False
    selected = event.get("event_type") in (sub.get("event_types") or ()) or \
        event.get("category") in (sub.get("event_categories") or ())
    return selected and scope_matches(sub.get("scope_filter"), event.get("scope"))
