"""Scope derivation (cycles-protocol-v0 §SCOPE DERIVATION) and budget scope grammar."""

from __future__ import annotations

import re
from typing import Mapping

LEVELS: tuple[str, ...] = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
_VALUE = re.compile(r"^[a-zA-Z0-9_.-]{1,128}$")


class ScopeError(ValueError):
    pass


def segments_of(fields: Mapping[str, str | None]) -> list[str]:
    """`level:value` segments in canonical order; absent levels are skipped, values lower-cased."""
    return [f"{level}:{fields[level].lower()}" for level in LEVELS if fields.get(level)]


def derive(fields: Mapping[str, str | None]) -> tuple[str, list[str]]:
    """(scope_path, affected scopes): one cumulative scope per provided level, in canonical order."""
    segs = segments_of(fields)
    scopes: list[str] = []
    path = ""
    for seg in segs:
        path = f"{path}/{seg}" if path else seg
        scopes.append(path)
    return path, scopes


def parse(scope: str) -> list[tuple[str, str]]:
    """Parse a concrete scope such as `tenant:acme/workspace:prod` into (level, value) pairs.

    Levels must appear at most once and in canonical order; values follow the subject charset.
    """
    if not scope or scope != scope.strip():
        raise ScopeError("scope must be a non-empty canonical scope such as 'tenant:acme/workspace:prod'")
    pairs: list[tuple[str, str]] = []
    last = -1
    for seg in scope.split("/"):
        level, sep, value = seg.partition(":")
        if not sep or level not in LEVELS:
            raise ScopeError(f"scope segment {seg!r} is not 'level:value' with level one of {', '.join(LEVELS)}")
        idx = LEVELS.index(level)
        if idx <= last:
            raise ScopeError(f"scope levels must follow the order {' → '.join(LEVELS)} without repeats")
        if not _VALUE.fullmatch(value):  # fullmatch: `$` alone would accept a trailing newline
            raise ScopeError(f"scope value {value!r} must match ^[a-zA-Z0-9_.-]+$ (at most 128 characters)")
        last = idx
        pairs.append((level, value.lower()))
    return pairs


def canonical(scope: str) -> str:
    return "/".join(f"{level}:{value}" for level, value in parse(scope))


def matches_filter(scope: str, wanted: Mapping[str, str], include_children: bool) -> bool:
    """Whether a budget scope belongs to a balance query.

    Every requested level must be present with the requested value. Without include_children the
    scope may not go deeper than the deepest requested level.
    """
    pairs = dict(parse(scope))
    for level, value in wanted.items():
        if pairs.get(level) != value.lower():
            return False
    if include_children:
        return True
    deepest = max(LEVELS.index(level) for level in wanted)
    return all(LEVELS.index(level) <= deepest for level in pairs)


def within_filter(scope: str, scope_filter: list[str] | tuple[str, ...]) -> bool:
    """Whether an API key restricted by `scope_filter` may act on `scope`.

    Entries of one level (`workspace:eng`, `workspace:ops`) are alternatives; entries of different
    levels must all hold (`workspace:eng` + `agent:*` = an agent inside workspace eng). `level:*`
    requires the level to be present. An entry with `/` is a policy-style pattern that the scope or
    one of its ancestors must match.
    """
    if not scope_filter:
        return True
    from .policies import matches

    pairs = dict(parse(scope)) if scope else {}
    chain = ["/".join(scope.split("/")[:i]) for i in range(1, scope.count("/") + 2)] if scope else []
    by_level: dict[str, list[str]] = {}
    for entry in scope_filter:
        if "/" in entry:
            if not any(matches(entry, s) for s in chain):
                return False
            continue
        level, _, value = entry.partition(":")
        by_level.setdefault(level, []).append(value.lower())
    for level, values in by_level.items():
        have = pairs.get(level)
        if have is None or not ("*" in values or have in values):
            return False
    return True
