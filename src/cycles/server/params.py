"""Query-string parsing with the protocol's errors: bad values are 400 INVALID_REQUEST, never a 500."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from ..protocol.errors import ErrorCode, ProtocolError


def bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST, message)


def int_param(params: Any, name: str, *, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad(f"{name} must be an integer between {lo} and {hi}") from None
    if not lo <= value <= hi:
        raise bad(f"{name} must be between {lo} and {hi}")
    return value


def bool_param(params: Any, name: str) -> bool | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    lowered = raw.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise bad(f"{name} must be true or false")


def enum_param(params: Any, name: str, allowed: tuple[str, ...]) -> str | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if raw not in allowed:
        raise bad(f"{name} must be one of {', '.join(allowed)}")
    return raw


def str_param(params: Any, name: str, *, max_length: int = 256) -> str | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > max_length:
        raise bad(f"{name} must be at most {max_length} characters")
    return raw


def time_param(params: Any, name: str) -> int | None:
    """An ISO 8601 date-time as epoch ms; blank means unset (spec: blank window bounds are ignored)."""
    raw = params.get(name)
    if raw is None or raw.strip() == "":
        return None
    return parse_iso(raw, name)


def iso(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def parse_iso(value: str, name: str) -> int:
    """An ISO 8601 date-time as epoch ms (UTC when no offset is given)."""
    try:
        parsed = datetime.fromisoformat(value.strip())
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return int(parsed.timestamp() * 1000)
    except (ValueError, OverflowError):
        raise bad(f"{name} must be an ISO 8601 date-time such as 2026-01-01T00:00:00Z") from None


def filter_hash(filters: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(filters, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def encode_cursor(payload: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(raw: str | None, expected_filters: str) -> dict[str, Any] | None:
    if raw is None or raw == "":
        return None
    try:
        padded = raw + "=" * (-len(raw) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(payload, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise bad("cursor is not a cursor this server issued") from None
    if payload.get("f") != expected_filters:
        raise bad("cursor was issued for different filters; restart from the first page")
    return payload


def time_cursor(cursor: dict[str, Any]) -> tuple[int, str]:
    """The (timestamp_ms, id) position of an audit or event cursor, checked: cursors come from clients."""
    k = cursor.get("k")
    if not (isinstance(k, list) and len(k) == 2 and type(k[0]) is int and 0 <= k[0] < 2**63
            and isinstance(k[1], str) and len(k[1]) <= 128):
        raise bad("cursor is not a cursor this server issued")
    return k[0], k[1]


MAX_LOG_SCAN = 20_000


async def page_log(scan_fn: Any, scan: Any, id_key: str, matches: Any, limit: int, fh: str,
                   cursor: dict[str, Any] | None) -> tuple[list[dict[str, Any]], bool, str | None]:
    """One page of a time-ordered log (audit rows, events): the store filters by tenant and time,
    `matches` by the rest. A sparse filter scans at most MAX_LOG_SCAN rows per page and then answers
    what it found with a cursor to continue. Returns (rows, has_more, next_cursor)."""
    if cursor is not None:
        scan.after = time_cursor(cursor)
    rows: list[dict[str, Any]] = []
    scanned, exhausted = 0, False
    while len(rows) <= limit and scanned < MAX_LOG_SCAN:
        batch = await scan_fn(scan)
        scanned += len(batch)
        for row in batch:
            scan.after = (row["timestamp_ms"], row[id_key])
            if matches(row):
                rows.append(row)
                if len(rows) > limit:
                    break
        if len(batch) < scan.limit:
            exhausted = True
            break
    page = rows[:limit]
    more = len(rows) > limit or (not exhausted and scanned >= MAX_LOG_SCAN)
    last = (page[-1]["timestamp_ms"], page[-1][id_key]) if len(rows) > limit else scan.after
    return page, more, (encode_cursor({"k": list(last), "f": fh}) if more and last else None)
