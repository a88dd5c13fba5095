"""Policies: scope patterns, which policies govern a reservation, and what they resolve to.

A pattern is `/`-separated `level:value` segments where a value may be `*`, optionally ending in a
lone `*` segment ("and every descendant"). A pattern that starts with `tenant:` is anchored at the
root; one that does not matches at the end of a scope (`agent:*` is every agent in every tenant).
The lone pattern `*` matches every scope.

A policy governs a reservation when its pattern matches any of the reservation's affected scopes
(the chain from the tenant down to the full path), so `tenant:acme` governs all of acme. Settings
are resolved field by field: the highest-priority governing policy that sets a field wins; ties go
to the policy matching the deeper scope, then to the smaller policy_id. Rate limits are all
enforced: every governing policy with a limit counts in its own bucket, one per matched scope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from .scopes import LEVELS

_VALUE = re.compile(r"^(\*|[a-z0-9_.-]{1,128})$")
WINDOW_MS = 60_000


class PatternError(ValueError):
    pass


def parse_pattern(pattern: str) -> tuple[list[tuple[str, str]], bool]:
    """(segments, descendants) of a scope pattern; raises PatternError with a reason."""
    if pattern == "*":
        return [], True
    if not pattern or pattern != pattern.strip() or len(pattern) > 1024:
        raise PatternError("scope_pattern must be a non-empty pattern such as 'tenant:acme/workspace:eng/*'")
    parts = pattern.split("/")
    if len(parts) > 1 and parts[0] == "*":
        parts = parts[1:]  # "*/agent:x": any prefix, which an unanchored pattern already means
        if parts[0].startswith("tenant:"):
            raise PatternError("a pattern starting with '*/' cannot name a tenant")
    descendants = parts[-1] == "*"
    if descendants:
        parts = parts[:-1]
        if not parts:
            raise PatternError("scope_pattern '*' must stand alone")
    segments: list[tuple[str, str]] = []
    last = -1
    for part in parts:
        level, sep, value = part.partition(":")
        if not sep or level not in LEVELS:
            raise PatternError(f"pattern segment {part!r} is not 'level:value' with level one of {', '.join(LEVELS)}")
        idx = LEVELS.index(level)
        if idx <= last:
            raise PatternError(f"pattern levels must follow the order {' → '.join(LEVELS)} without repeats")
        value = value.lower()
        if not _VALUE.fullmatch(value):
            raise PatternError(f"pattern value {value!r} must be '*' or match ^[a-zA-Z0-9_.-]+$")
        last = idx
        segments.append((level, value))
    return segments, descendants


def canonical_pattern(pattern: str) -> str:
    segments, descendants = parse_pattern(pattern)
    text = "/".join(f"{level}:{value}" for level, value in segments)
    if descendants:
        return f"{text}/*" if text else "*"
    return text


def _seg_match(seg: str, pat: tuple[str, str]) -> bool:
    level, _, value = seg.partition(":")
    return level == pat[0] and (pat[1] == "*" or value == pat[1])


def matches(pattern: str, scope: str) -> bool:
    """Whether a concrete scope (canonical, lower-case) matches a canonical pattern."""
    segments, descendants = parse_pattern(pattern)
    if not segments:
        return True
    segs = scope.split("/")
    k = len(segments)
    if segments[0][0] == "tenant":
        if len(segs) < k or (len(segs) > k and not descendants) or (len(segs) == k and descendants):
            return False
        return all(_seg_match(s, p) for s, p in zip(segs, segments))
    # Unanchored: the pattern ends the scope, or (with /*) is followed by at least one more segment.
    for start in range(len(segs) - k + 1):
        end = start + k
        if all(_seg_match(s, p) for s, p in zip(segs[start:end], segments)):
            if (end == len(segs)) != descendants:
                return True
    return False


def is_effective(policy: dict[str, Any], now_ms: int) -> bool:
    if policy.get("status", "ACTIVE") != "ACTIVE":
        return False
    start, until = policy.get("effective_from_ms"), policy.get("effective_until_ms")
    return (start is None or now_ms >= start) and (until is None or now_ms < until)


@dataclass(frozen=True)
class RateLimit:
    """One bucket: `limit` events per minute for `policy_id` at `scope`."""

    kind: str  # "reserve" | "commit"
    policy_id: str
    scope: str
    limit: int

    @property
    def bucket(self) -> str:
        return f"{self.kind}|{self.policy_id}|{self.scope}"


@dataclass
class Resolution:
    caps: dict[str, Any] | None = None
    default_ttl_ms: int | None = None
    max_ttl_ms: int | None = None
    max_extensions: int | None = None
    overage_policy: str | None = None
    limits: list[RateLimit] = field(default_factory=list)
    policy_ids: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # setting -> policy_id that supplied it

    def store_args(self) -> dict[str, Any]:
        """What the store needs inside the reserve transaction."""
        if not self.policy_ids:
            return {}
        return {k: v for k, v in (("default_ttl_ms", self.default_ttl_ms), ("max_ttl_ms", self.max_ttl_ms),
                                  ("max_extensions", self.max_extensions), ("overage_policy", self.overage_policy))
                if v is not None}


_CAP_FIELDS = ("max_tokens", "max_steps_remaining", "tool_allowlist", "tool_denylist", "cooldown_ms")


def resolve(policies: Iterable[dict[str, Any]], scopes: list[str], now_ms: int) -> Resolution:
    """What the governing policies impose on a reservation whose affected scopes are `scopes`."""
    governing: list[tuple[dict[str, Any], str]] = []
    for policy in policies:
        if not is_effective(policy, now_ms):
            continue
        matched = [s for s in scopes if matches(policy["scope_pattern"], s)]
        if matched:
            governing.append((policy, matched[-1]))
    governing.sort(key=lambda pm: (-(pm[0].get("priority") or 0), -pm[1].count("/"), pm[0]["policy_id"]))
    out = Resolution(policy_ids=[p["policy_id"] for p, _ in governing])
    caps: dict[str, Any] = {}
    for policy, scope in governing:
        pid = policy["policy_id"]
        for name in _CAP_FIELDS:
            value = (policy.get("caps") or {}).get(name)
            if value is not None and name not in caps:
                caps[name] = value
                out.sources[f"caps.{name}"] = pid
        ttl = policy.get("reservation_ttl_override") or {}
        for name, attr in (("default_ttl_ms", "default_ttl_ms"), ("max_ttl_ms", "max_ttl_ms"),
                           ("max_extensions", "max_extensions")):
            if ttl.get(name) is not None and getattr(out, attr) is None:
                setattr(out, attr, ttl[name])
                out.sources[name] = pid
        if policy.get("commit_overage_policy") and out.overage_policy is None:
            out.overage_policy = policy["commit_overage_policy"]
            out.sources["commit_overage_policy"] = pid
        limits = policy.get("rate_limits") or {}
        for kind, name in (("reserve", "max_reservations_per_minute"), ("commit", "max_commits_per_minute")):
            if limits.get(name):
                # Each matched scope is its own bucket: `agent:*` limits every agent separately.
                for s in scopes:
                    if matches(policy["scope_pattern"], s):
                        out.limits.append(RateLimit(kind, pid, s, int(limits[name])))
    out.caps = caps or None
    return out


def window_count(prev: int, cur: int, now_ms: int) -> tuple[int, int]:
    """Sliding-window estimate scaled by WINDOW_MS (integers only): prev weighted by the part of the
    previous minute still inside the window, plus the current minute. Compare with limit * WINDOW_MS."""
    elapsed = now_ms % WINDOW_MS
    return prev * (WINDOW_MS - elapsed) + cur * WINDOW_MS, elapsed


def retry_after_ms(prev: int, cur: int, limit: int, now_ms: int) -> int:
    """How long until one more event fits: when the previous minute's weight has decayed enough, or
    the current minute ends."""
    scaled, elapsed = window_count(prev, cur, now_ms)
    need = scaled + WINDOW_MS - limit * WINDOW_MS  # excess to shed, scaled
    if need <= 0:
        return 0
    if prev > 0:
        wait = -(-need // prev)  # each ms sheds `prev` scaled units
        if elapsed + wait < WINDOW_MS:
            return wait
    return WINDOW_MS - elapsed


def rate_error(bucket: str, limit: int, policy_id: str, scope: str, retry_ms: int) -> Exception:
    from ..protocol.errors import ErrorCode, ProtocolError

    kind = bucket.split("|", 1)[0]
    what = "reservations" if kind == "reserve" else "commits"
    return ProtocolError(
        ErrorCode.LIMIT_EXCEEDED,
        f"Rate limit of policy {policy_id} exceeded: at most {limit} {what} per minute for scope {scope}",
        status=429,
        details={"policy_id": policy_id, "scope": scope, "limit": limit, "limit_type": f"max_{what}_per_minute",
                 "retry_after_ms": max(retry_ms, 1)},
        headers={"Retry-After": str(max(1, -(-retry_ms // 1000)))},
    )
