"""The derived-event analyzers: events no single request produces, found by looking at the store.

    budget.threshold_crossed      utilization crossed a threshold (rising; falling once re-armed)
    budget.burn_rate_anomaly      the spend rate of the last window is far above the baseline
    reservation.denial_rate_spike / reservation.expiry_rate_spike / api_key.auth_failure_rate_spike
                                  too many reservation.denied / reservation.expired / api_key.auth_failed
                                  events in the rolling window
    api_key.expired               an ACTIVE key's expires_at passed
    system.high_latency           the p99 latency the caller measured is above the threshold

`run_analyzers(store)` is called by every server's sweeper about once a second. Each analyzer paces
itself (per process: thresholds every 5 s, rate spikes every 15 s, ...). Whatever the number of
processes, each condition is emitted exactly once: the analyzer state lives in versioned documents
(kind "analyzer") and events are written by the same compare-and-set that advances the state
(`emit.save_state`). Only the `Store` interface is used, so every store kind works the same.

Amounts and ratios are compared as exact fractions; floats appear only in the event payloads.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Awaitable, Callable

from ..core.events import SYSTEM_TENANT
from ..protocol.errors import StoreUnavailable
from ..store.base import AuditScan, Store
from .config import CONFIG_DOC_ID, CONFIG_KIND, AnalyzerConfig, parse_config
from .emit import BURN_KIND, KIND, event, new_correlation_id, save_state
from .matching import BURN_EVENT, THRESHOLD_EVENT, listening, sub_multiplier, sub_thresholds

log = logging.getLogger("cycles.events")

BUDGET_PAGE = 500
EVENT_PAGE = 1000
MINUTE_MS = 60_000

# document ids (kind "analyzer"; the burn-rate sample rings, larger and written every minute, are kind
# "analyzer-burn" so the 5-second threshold pass does not read them); budget documents belong to the
# budget's tenant, a spike's and an expired key's to the tenant concerned, the others to "__system__"
THRESHOLD_PREFIX = "threshold|"
BURN_PREFIX = "burn|"
SPIKE_PREFIX = "spike|"
KEY_PREFIX = "apikey-expired|"
LATENCY_DOC = "latency"

# metric -> (counted event type, emitted event type, config attribute of the threshold)
SPIKES = {
    "denial_rate": ("reservation.denied", "reservation.denial_rate_spike", "denial_spike_threshold"),
    "expiry_rate": ("reservation.expired", "reservation.expiry_rate_spike", "expiry_spike_threshold"),
    "auth_failure_rate": ("api_key.auth_failed", "api_key.auth_failure_rate_spike", "auth_failure_spike_threshold"),
}
SYSTEM_WIDE_METRICS = ("auth_failure_rate",)  # counted over every tenant, emitted as "__system__"


def budget_key(tenant: str, scope: str, unit: str) -> str:
    return f"{tenant}|{scope}|{unit}"



@dataclass
class Pass:
    """What one run of the analyzers reads at most once."""

    store: Store
    cfg: AnalyzerConfig
    now: int
    _budgets: list[dict[str, Any]] | None = None
    _docs: dict[str, dict[str, Any]] | None = None
    _burn_docs: dict[str, dict[str, Any]] | None = None
    _subs: list[dict[str, Any]] | None = None
    rolling: RollingCounts = field(default_factory=lambda: RollingCounts())  # the process's, kept across runs

    async def budgets(self) -> list[dict[str, Any]]:
        if self._budgets is None:
            out: list[dict[str, Any]] = []
            after = None
            while True:
                page = await self.store.list_budgets(None, {}, BUDGET_PAGE, after)
                out += page.items
                if not page.has_more or not page.items:
                    break
                last = page.items[-1]
                after = (last["tenant_id"], last["ledger"].scope, last["ledger"].unit)
            self._budgets = [b for b in out if b["ledger"].status != "CLOSED"]
        return self._budgets

    async def docs(self) -> dict[str, dict[str, Any]]:
        if self._docs is None:
            self._docs = {d["doc_id"]: d for d in await self.store.list_docs(KIND, None) if "doc_id" in d}
        return self._docs

    async def burn_docs(self) -> dict[str, dict[str, Any]]:
        if self._burn_docs is None:
            self._burn_docs = {d["doc_id"]: d for d in await self.store.list_docs(BURN_KIND, None) if "doc_id" in d}
        return self._burn_docs

    async def subs(self) -> list[dict[str, Any]]:
        if self._subs is None:
            self._subs = await self.store.list_docs("webhook", None)
        return self._subs


# ---- budget.threshold_crossed ----

def utilization(led: Any, basis: str) -> Fraction | None:
    """Consumption of the allocation, exactly: spent / allocated (the admin API's budget filters use
    the same ratio), or (spent + reserved) / allocated with the `spent_plus_reserved` basis. None
    when nothing is allocated (no ratio to speak of)."""
    if led.allocated <= 0:
        return None
    used = led.spent + (led.reserved if basis == "spent_plus_reserved" else 0)
    return Fraction(used, led.allocated)


def _threshold_key(t: Fraction) -> str:
    return f"{t.numerator}/{t.denominator}"


def _parse_threshold_key(text: str) -> Fraction | None:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


async def analyze_thresholds(p: Pass) -> int:
    cfg, emitted = p.cfg, 0
    docs, subs = await p.docs(), await p.subs()
    for rec in await p.budgets():
        tenant, led = rec["tenant_id"], rec["ledger"]
        u = utilization(led, cfg.utilization_basis)
        if u is None:
            continue
        doc_id = THRESHOLD_PREFIX + budget_key(tenant, led.scope, led.unit)
        doc = docs.get(doc_id)
        fired = {k for k in (doc or {}).get("fired") or [] if _parse_threshold_key(k) is not None}
        wanted = set(cfg.default_thresholds)
        for sub in listening(subs, THRESHOLD_EVENT, tenant, led.scope):
            wanted.update(sub_thresholds(sub))
        rising = sorted(t for t in wanted if u >= t and _threshold_key(t) not in fired)
        falling: list[Fraction] = []
        kept: set[str] = set()
        for key in fired:
            t = _parse_threshold_key(key)
            assert t is not None
            if u < t - cfg.threshold_hysteresis:
                if t in wanted:
                    falling.append(t)  # re-armed; thresholds nobody wants any more are dropped silently
            elif t in wanted:
                kept.add(key)
        new_fired = sorted(kept | {_threshold_key(t) for t in rising}, key=Fraction)
        if set(new_fired) == fired:
            continue  # nothing crossed, nothing re-armed: no write
        cid = new_correlation_id()
        base = {"scope": led.scope, "unit": led.unit, "utilization": float(u), "allocated": led.allocated,
                "remaining": led.remaining, "spent": led.spent, "reserved": led.reserved}
        events = [event(THRESHOLD_EVENT, tenant, led.scope,
                        {**base, "threshold": float(t), "direction": "rising"}, cid) for t in rising]
        events += [event(THRESHOLD_EVENT, tenant, led.scope,
                         {**base, "threshold": float(t), "direction": "falling"}, cid)
                   for t in sorted(falling, reverse=True)]
        record = {"doc_id": doc_id, "analyzer": "threshold", "tenant_id": tenant, "scope": led.scope,
                  "unit": led.unit, "fired": new_fired, "utilization": _threshold_key(u), "evaluated_at_ms": p.now}
        n = await save_state(p.store, tenant, doc_id, record, doc["version"] if doc else None, events)
        emitted += n or 0
    return emitted


# ---- budget.burn_rate_anomaly ----

def value_at(samples: list[list[int]], t: int) -> Fraction | None:
    """Spent at time t, linear between the samples around it (spend between two observations is
    taken as even); None before the first sample."""
    if not samples or t < samples[0][0]:
        return None
    prev = samples[0]
    for s in samples:
        if s[0] == t:
            return Fraction(s[1])
        if s[0] > t:
            span = s[0] - prev[0]
            return Fraction(prev[1]) + Fraction((s[1] - prev[1]) * (t - prev[0]), span) if span else Fraction(s[1])
        prev = s
    return Fraction(prev[1])


@dataclass(slots=True)
class BurnVerdict:
    current: Fraction  # units per ms
    baseline: Fraction
    window_delta: Fraction


def burn_rates(samples: list[list[int]], now: int, cfg: AnalyzerConfig) -> BurnVerdict | None:
    """Current rate over the last window and baseline rate over the (up to) baseline period before
    it; None while the history is shorter than the minimum."""
    w = cfg.burn_rate_window_ms
    start = now - w
    s_now, s_start = value_at(samples, now), value_at(samples, start)
    if s_now is None or s_start is None:
        return None
    base_from = max(samples[0][0], start - cfg.burn_rate_baseline_ms)
    span = start - base_from
    if span < cfg.burn_rate_min_history_ms:
        return None
    s_base = value_at(samples, base_from)
    assert s_base is not None
    return BurnVerdict(current=(s_now - s_start) / w, baseline=(s_start - s_base) / span, window_delta=s_now - s_start)


async def analyze_burn_rate(p: Pass) -> int:
    cfg, emitted = p.cfg, 0
    docs, subs = await p.burn_docs(), await p.subs()
    keep_ms = cfg.burn_rate_baseline_ms + cfg.burn_rate_window_ms + 2 * cfg.burn_rate_sample_ms
    for rec in await p.budgets():
        tenant, led = rec["tenant_id"], rec["ledger"]
        doc_id = BURN_PREFIX + budget_key(tenant, led.scope, led.unit)
        doc = docs.get(doc_id)
        if doc is None and led.spent <= 0:
            continue  # nothing spent yet: no history worth keeping
        samples: list[list[int]] = [s for s in (doc or {}).get("samples") or []
                                    if isinstance(s, list) and len(s) == 2]
        if samples and p.now - samples[-1][0] < cfg.burn_rate_sample_ms:
            continue  # sampled recently (by this process or another)
        if samples and led.spent < samples[-1][1]:
            samples = []  # spent went down: a reset or a new period; the baseline starts over
        samples.append([p.now, led.spent])
        samples = [s for s in samples if s[0] >= p.now - keep_ms]
        last_anomaly = (doc or {}).get("last_anomaly_ms")
        events: list[dict[str, Any]] = []
        verdict = burn_rates(samples, p.now, cfg)
        cooling = isinstance(last_anomaly, int) and p.now - last_anomaly < cfg.burn_rate_cooldown_ms
        if verdict is not None and not cooling:
            listeners = listening(subs, BURN_EVENT, tenant, led.scope)
            multiplier = min([cfg.burn_rate_multiplier] + [sub_multiplier(s) for s in listeners])
            per_minute = verdict.current * MINUTE_MS
            material = (verdict.window_delta > 0 and per_minute >= cfg.burn_rate_min_per_minute
                        and verdict.window_delta >= cfg.burn_rate_min_window_fraction * max(led.allocated, 0))
            if material and verdict.current > multiplier * verdict.baseline:
                events.append(event(BURN_EVENT, tenant, led.scope, burn_data(led, verdict, cfg), new_correlation_id()))
                last_anomaly = p.now
        record = {"doc_id": doc_id, "analyzer": "burn_rate", "tenant_id": tenant, "scope": led.scope, "unit": led.unit,
                  "samples": samples, "last_anomaly_ms": last_anomaly}
        n = await save_state(p.store, tenant, doc_id, record, doc["version"] if doc else None, events, kind=BURN_KIND)
        emitted += n or 0
    return emitted


def burn_data(led: Any, v: BurnVerdict, cfg: AnalyzerConfig) -> dict[str, Any]:
    w = cfg.burn_rate_window_ms
    remaining = led.remaining
    # minutes until remaining is used up at the current rate, exactly: remaining / (delta per minute), floored
    exhaustion = 0 if remaining <= 0 else math.floor(Fraction(remaining * w) / (v.window_delta * MINUTE_MS))
    data: dict[str, Any] = {
        "scope": led.scope, "unit": led.unit, "current_rate": float(v.current * MINUTE_MS),
        "baseline_rate": float(v.baseline * MINUTE_MS), "window_seconds": w // 1000,
        "projected_exhaustion_minutes": exhaustion,
    }
    if v.baseline > 0:
        data["multiplier"] = float(v.current / v.baseline)
    return data


# ---- rate spikes ----

@dataclass
class RollingCounts:
    """The counted events (denials, expiries, auth failures) of the rolling window, kept by one process
    between runs: each run reads only what was written since the previous one (and a short look-back
    for events of the same milliseconds committed late; event ids make re-reading them harmless)."""

    rows: dict[str, tuple[int, str, str]] = field(default_factory=dict)  # event_id -> (ts, metric, tenant)
    high: int | None = None  # events up to this time have been read
    lookback_ms: int = 5_000

    async def refresh(self, store: Store, now: int, window: int, limit: int) -> dict[tuple[str, str], int]:
        lo = now - window + 1
        if self.high is None or self.high > now or self.high < lo:
            self.rows, start = {}, lo  # first run, a clock that went back, or a gap longer than the window
        else:
            start = max(lo, self.high - self.lookback_ms)
        counting = {counted: metric for metric, (counted, _, _) in SPIKES.items()}
        after: tuple[int, str] | None = None
        seen = 0
        while seen < limit:
            page = await store.scan_events(AuditScan(from_ms=start, to_ms=now, descending=False, after=after,
                                                     limit=EVENT_PAGE))
            for ev in page:
                metric = counting.get(ev.get("event_type"))
                if metric is not None:
                    tenant = SYSTEM_TENANT if metric in SYSTEM_WIDE_METRICS else ev.get("tenant_id") or SYSTEM_TENANT
                    self.rows[ev["event_id"]] = (int(ev["timestamp_ms"]), metric, tenant)
            seen += len(page)
            if len(page) < EVENT_PAGE:
                break
            after = (page[-1]["timestamp_ms"], page[-1]["event_id"])
        if seen >= limit:
            log.warning("rate spike scan stopped after %d events; counts are lower bounds", seen)
        self.high = now
        self.rows = {k: v for k, v in self.rows.items() if v[0] >= lo}
        counts: dict[tuple[str, str], int] = {}
        for _, metric, tenant in self.rows.values():
            counts[(metric, tenant)] = counts.get((metric, tenant), 0) + 1
        return counts


async def analyze_spikes(p: Pass) -> int:
    cfg = p.cfg
    w = cfg.rate_window_ms
    counts = await p.rolling.refresh(p.store, p.now, w, cfg.rate_scan_limit)
    emitted = 0
    docs = await p.docs()
    for (metric, tenant), count in sorted(counts.items()):
        _, emits, attr = SPIKES[metric]
        threshold = getattr(cfg, attr)
        if count < threshold:
            continue
        doc_id = f"{SPIKE_PREFIX}{metric}|{tenant}"
        doc = docs.get(doc_id)
        last = (doc or {}).get("last_emitted_ms")
        if isinstance(last, int) and p.now - last < w:
            continue  # one spike event per window
        data = {"metric": metric, "current_rate": count * MINUTE_MS / w, "threshold_rate": threshold * MINUTE_MS / w,
                "window_seconds": w // 1000, "sample_count": count}
        record = {"doc_id": doc_id, "analyzer": "spike", "metric": metric, "tenant_id": tenant,
                  "last_emitted_ms": p.now, "last_count": count}
        n = await save_state(p.store, tenant, doc_id, record, doc["version"] if doc else None,
                             [event(emits, tenant, None, data, new_correlation_id())])
        emitted += n or 0
    return emitted


# ---- api_key.expired ----

async def analyze_api_keys(p: Pass) -> int:
    cfg, emitted = p.cfg, 0
    docs = await p.docs()
    for key in await p.store.list_api_keys(None):
        expires = key.get("expires_at_ms")
        if key.get("status") != "ACTIVE" or not isinstance(expires, int) or isinstance(expires, bool):
            continue
        if not (p.now - cfg.api_key_expiry_lookback_ms <= expires <= p.now):
            continue
        doc_id = KEY_PREFIX + str(key.get("key_id"))
        if doc_id in docs:
            continue
        data = {"key_id": key.get("key_id"), "key_name": key.get("name"), "previous_status": "ACTIVE",
                "new_status": "EXPIRED", "permissions": list(key.get("permissions") or [])}
        data = {k: v for k, v in data.items() if v is not None}
        tenant = key.get("tenant_id") or SYSTEM_TENANT
        record = {"doc_id": doc_id, "analyzer": "api_key_expired", "key_id": key.get("key_id"), "tenant_id": tenant,
                  "expires_at_ms": expires, "emitted_at_ms": p.now}
        n = await save_state(p.store, tenant, doc_id, record, None,
                             [event("api_key.expired", tenant, None, data, new_correlation_id())])
        emitted += n or 0
    return emitted


# ---- system.high_latency ----

async def analyze_latency(store: Store, cfg: AnalyzerConfig, now: int, latency: float) -> tuple[int, int | None]:
    """Returns (events emitted, when the last alert was emitted if known)."""
    doc = await store.get_doc(KIND, LATENCY_DOC)
    last = (doc or {}).get("last_emitted_ms")
    if isinstance(last, int) and now - last < cfg.latency_cooldown_ms:
        return 0, last
    threshold = cfg.latency_threshold_ms
    severity = "critical" if latency >= 5 * threshold else "warning"
    p99 = round(float(latency), 3)
    data = {"component": "server", "severity": severity,
            "message": f"p99 operation latency {p99:g} ms over the last minute is above {threshold} ms",
            "details": {"p99_ms": p99, "threshold_ms": threshold, "window_seconds": 60}}
    record = {"doc_id": LATENCY_DOC, "analyzer": "latency", "last_emitted_ms": now, "p99_ms": p99}
    n = await save_state(store, SYSTEM_TENANT, LATENCY_DOC, record, doc["version"] if doc else None,
                         [event("system.high_latency", SYSTEM_TENANT, None, data, new_correlation_id())])
    return n or 0, now if n else None


# ---- the runner ----

Analyze = Callable[[Pass], Awaitable[int]]
ANALYZERS: dict[str, tuple[Analyze, str]] = {
    "thresholds": (analyze_thresholds, "threshold_interval_ms"),
    "burn_rate": (analyze_burn_rate, "burn_rate_interval_ms"),
    "spikes": (analyze_spikes, "rate_interval_ms"),
    "api_keys": (analyze_api_keys, "api_key_interval_ms"),
}


@dataclass
class Analyzer:
    """One process's pacing of the analyzers (the state that makes events exactly-once is in the
    store, not here). `run_analyzers` keeps one per store object."""

    next_due: dict[str, int] = field(default_factory=dict)
    config: AnalyzerConfig | None = None
    config_until: int = 0
    latency_quiet_until: int = 0
    rolling: RollingCounts = field(default_factory=RollingCounts)

    async def load_config(self, store: Store, now: int) -> AnalyzerConfig:
        if self.config is None or now >= self.config_until or now < self.config_until - 3_600_000:
            self.config = parse_config(await store.get_doc(CONFIG_KIND, CONFIG_DOC_ID))
            self.config_until = now + self.config.config_ttl_ms
        return self.config

    def _due(self, name: str, now: int, interval: int) -> bool:
        nxt = self.next_due.get(name)
        return nxt is None or now >= nxt or nxt - now > interval  # a clock that went back re-arms

    async def run(self, store: Store, *, now_ms: int | None = None, latency: float | None = None) -> int:
        try:
            now = now_ms if now_ms is not None else await store.now_ms()
            cfg = await self.load_config(store, now)  # read again at most every config_ttl
        except StoreUnavailable as exc:
            log.info("analyzers: store unavailable (%s); retried on the next sweep", exc)
            return 0
        emitted = 0
        p = Pass(store, cfg, now, rolling=self.rolling)
        for name, (fn, attr) in ANALYZERS.items():
            interval = getattr(cfg, attr)
            if not self._due(name, now, interval):
                continue
            self.next_due[name] = now + interval
            try:
                emitted += await fn(p)
            except StoreUnavailable as exc:  # the health check reports outages; retried when next due
                log.info("analyzer %s: store unavailable (%s)", name, exc)
                return emitted
            except Exception:  # noqa: BLE001 - one analyzer's failure must not stop the others
                log.exception("analyzer %s failed", name)
        if self.latency_quiet_until - now > cfg.latency_cooldown_ms:
            self.latency_quiet_until = 0  # the clock went back
        if latency is not None and latency > cfg.latency_threshold_ms and now >= self.latency_quiet_until:
            try:
                n, last = await analyze_latency(store, cfg, now, latency)
                emitted += n
                if last is not None:
                    self.latency_quiet_until = last + cfg.latency_cooldown_ms
            except StoreUnavailable as exc:
                log.info("latency analyzer: store unavailable (%s)", exc)
            except Exception:  # noqa: BLE001
                log.exception("latency analyzer failed")
        return emitted


_PER_STORE: "weakref.WeakKeyDictionary[Store, Analyzer]" = weakref.WeakKeyDictionary()


async def run_analyzers(store: Store, *, now_ms: int | None = None, latency: float | None = None) -> int:
    """Run the analyzers that are due for this process; returns the number of events emitted.
    `latency`: the p99 operation latency (ms) over the last minute, or None when not measured."""
    analyzer = _PER_STORE.get(store)
    if analyzer is None:
        analyzer = _PER_STORE[store] = Analyzer()
    return await analyzer.run(store, now_ms=now_ms, latency=latency)
