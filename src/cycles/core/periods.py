"""Budget periods: where period k of a budget starts and ends, calendar-aware in a time zone.

A budget's first period is [period_start, period_end). With an `interval` (DAILY, WEEKLY,
MONTHLY, QUARTERLY, YEARLY) later periods follow the calendar in the budget's time zone: a monthly
budget anchored at 00:00 on the 31st in Europe/Paris renews at local midnight on the last day of
shorter months and on the 31st again when there is one, across DST changes. Without an interval
every period lasts exactly as long as the first. Period k is always computed from the anchor (the
first start), never from the previous end, so rounding never drifts.
"""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

INTERVALS = ("DAILY", "WEEKLY", "MONTHLY", "QUARTERLY", "YEARLY")
_MONTHS = {"MONTHLY": 1, "QUARTERLY": 3, "YEARLY": 12}


class PeriodError(ValueError):
    pass


def zone(name: str | None) -> ZoneInfo | timezone:
    if not name or name == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise PeriodError(f"unknown time zone {name!r} (use an IANA name such as Europe/Paris)") from exc


def _shift(local: datetime, interval: str, n: int) -> datetime:
    if interval == "DAILY":
        return local + timedelta(days=n)
    if interval == "WEEKLY":
        return local + timedelta(weeks=n)
    months = local.month - 1 + _MONTHS[interval] * n
    year, month = local.year + months // 12, months % 12 + 1
    day = min(local.day, calendar.monthrange(year, month)[1])
    return local.replace(year=year, month=month, day=day)


def boundary(anchor_ms: int, first_end_ms: int, k: int, interval: str | None, tz: str | None) -> int:
    """Epoch ms where period k starts (k=0: the anchor; k=1: the first period's end)."""
    if k == 0:
        return anchor_ms
    if interval is None:
        return anchor_ms + k * (first_end_ms - anchor_ms)
    z = zone(tz)
    local = datetime.fromtimestamp(anchor_ms / 1000, tz=timezone.utc).astimezone(z).replace(tzinfo=None)
    shifted = _shift(local, interval, k).replace(tzinfo=z)
    return int(shifted.astimezone(timezone.utc).timestamp() * 1000)


def validate(start_ms: int, end_ms: int, interval: str | None, tz: str | None) -> None:
    if end_ms <= start_ms:
        raise PeriodError("period_end must be after period_start")
    zone(tz)
    if interval is not None and interval not in INTERVALS:
        raise PeriodError(f"period_interval must be one of {', '.join(INTERVALS)}")
    if interval is not None and boundary(start_ms, end_ms, 1, interval, tz) != end_ms:
        raise PeriodError(f"period_end must be one {interval.lower()} step after period_start in {tz or 'UTC'}")
