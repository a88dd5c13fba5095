"""Building hostile request bodies: set or remove a field at a dotted path, and write JSON tokens
verbatim (numbers beyond int64, NaN, 1e6, deep nesting) that json.dumps would never produce."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any


class _Delete:
    """Marker: remove the field at this path."""


DELETE = _Delete()


@dataclass(frozen=True)
class Raw:
    """A JSON token written verbatim into the body."""

    text: str


def with_(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `base` with `value` set at the dotted `path` (DELETE removes the field)."""
    out = copy.deepcopy(base)
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if isinstance(value, _Delete):
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    return out


def encode(obj: Any) -> bytes:
    raws: list[str] = []

    def sub(x: Any) -> Any:
        if isinstance(x, Raw):
            raws.append(x.text)
            return f"__raw_{len(raws) - 1}__"
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        if isinstance(x, list):
            return [sub(v) for v in x]
        return x

    text = json.dumps(sub(obj))
    for i, raw in enumerate(raws):
        text = text.replace(f'"__raw_{i}__"', raw)
    return text.encode()
