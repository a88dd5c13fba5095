"""Prometheus metrics: requests, latency, decisions by reason, active reservations, webhook delivery.

With several worker processes, `PROMETHEUS_MULTIPROC_DIR` (set by `cycles serve --workers N`) makes
every worker write its samples there and any worker can answer a scrape with the sum.
"""

from __future__ import annotations

import bisect
import collections
import os
import threading
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Flush:
    """Registered first in the registry, so any read of it (a /metrics scrape, the separate metrics port's
    thread, get_sample_value) first moves what the hot path counted into the collectors it reads next."""

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self.metrics.flush()
        return []


class Metrics:
    """The request and decision metrics are counted in plain dicts on the hot path (a dict update instead of a
    labelled child's lock, value object and, for the histogram, a scan of the buckets) and moved into the
    registry when it is read. Only the event loop's thread counts; a reader on another thread moves the
    difference between the running totals and what it moved before (under a lock), so nothing is lost or
    counted twice whichever thread reads. Under PROMETHEUS_MULTIPROC_DIR another worker may answer the
    scrape from this one's files, so every count goes to the registry at once there."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=5_000)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._decisions: dict[tuple[str, str, str], Any] = {}
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # running totals by key, as counted on the hot path, and what of them is in the registry already
        self._request_counts: dict[tuple[str, str, int], int] = {}
        self._latency_counts: dict[str, list[Any]] = {}  # route -> [per-bucket counts..., sum]
        self._decision_counts: dict[tuple[str, str, str], int] = {}
        self._moved: dict[Any, Any] = {}
        self._flush_lock = threading.Lock()
        self._outbox: tuple[Any, Any, Any] | None = None  # the cluster outbox gauges, made on first use
        if not self.multiprocess:
            self.registry.register(_Flush(self))
        self.requests = Counter("cycles_http_requests_total", "HTTP requests answered",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("cycles_http_request_duration_seconds", "Time to answer a request",
                                 ["route"], buckets=_BUCKETS, registry=self.registry)
        self.decisions = Counter("cycles_decisions_total", "Budget decisions by endpoint, decision and reason",
                                 ["endpoint", "decision", "reason"], registry=self.registry)
        self.auth_failures = Counter(
            "cycles_auth_failures_total", "Failed key checks by outcome: refused (401), throttled (429 before any "
            "verification), unrecorded (401 without an audit row or event: over the per-source record limit)",
            ["outcome"], registry=self.registry)
        self.active = Gauge("cycles_active_reservations", "Reservations currently ACTIVE in the store",
                            registry=self.registry, multiprocess_mode="mostrecent")
        # -- webhook delivery (cycles.webhooks.deliver) --
        self.webhook_attempts = Counter(
            "cycles_webhook_delivery_attempts_total", "Webhook delivery attempts by outcome (success, http_3xx, "
            "http_4xx, http_5xx, timeout, transport_error, refused)", ["outcome"], registry=self.registry)
        self.webhook_latency = Histogram("cycles_webhook_delivery_latency_seconds", "Time of one delivery attempt",
                                         ["outcome"], buckets=_WEBHOOK_BUCKETS, registry=self.registry)
        self.webhook_results = Counter("cycles_webhook_deliveries_total",
                                       "Deliveries finished, by result (succeeded, failed) and reason",
                                       ["result", "reason"], registry=self.registry)
        self.webhook_created = Counter("cycles_webhook_deliveries_enqueued_total",
                                       "Deliveries created, by source (dispatch, replay, resend)", ["source"],
                                       registry=self.registry)
        self.webhook_queue = Gauge("cycles_webhook_delivery_queue_depth", "Deliveries due now and not yet claimed",
                                   registry=self.registry, multiprocess_mode="max")
        self.webhook_in_flight = Gauge("cycles_webhook_deliveries_in_flight", "Delivery attempts running now",
                                       registry=self.registry, multiprocess_mode="livesum")
        self.webhook_auto_disabled = Counter("cycles_webhook_subscription_auto_disabled_total",
                                             "Subscriptions disabled after consecutive failures", registry=self.registry)

    def cluster_outbox(self, status: dict[str, Any]) -> None:
        """Redis Cluster: the lag of the cross-tenant views (cycles.store.redis_outbox), as read from the
        store at scrape time (the same figures on every server); registered on the first scrape."""
        if self._outbox is None:
            self._outbox = (
                Gauge("cycles_cluster_outbox_lag_seconds", "Age of the oldest outbox entry not yet in the "
                      "cross-tenant views when the last drain round began (or the time since the last round "
                      "when no server drains)", registry=self.registry, multiprocess_mode="max"),
                Gauge("cycles_cluster_outbox_tenants_waiting", "Tenants whose outbox held entries when the last "
                      "drain round began", registry=self.registry, multiprocess_mode="max"),
                Gauge("cycles_cluster_outbox_entries_applied_total", "Outbox entries applied to the cross-tenant "
                      "views, by every server since the cluster's views were created", registry=self.registry,
                      multiprocess_mode="max"))
        lag, waiting, applied = self._outbox
        lag.set(status["lag_seconds"])
        waiting.set(status["tenants_waiting"])
        applied.set(status["entries_applied"])

    def observe(self, ctx, method: str, status: int) -> None:  # noqa: ANN001 - Ctx, avoids an import cycle
        now = time.perf_counter()
        elapsed = now - ctx.started
        key = (ctx.route, method, status)
        if not self.multiprocess:
            counts = self._request_counts
            counts[key] = counts.get(key, 0) + 1
            latency = self._latency_counts.get(ctx.route)
            if latency is None:
                latency = self._latency_counts[ctx.route] = [0] * (len(_BUCKETS) + 1) + [0.0]
            # the first bucket whose bound is >= elapsed, as Histogram.observe picks it (+Inf is the last)
            latency[bisect.bisect_left(_BUCKETS, elapsed)] += 1
            latency[-1] += elapsed
            self.recent.append((now, elapsed))
            return
        children = self._children.get(key)
        if children is None:  # labelled children are looked up once per (route, method, status)
            children = self._children[key] = (self.requests.labels(ctx.route, method, str(status)),
                                              self.latency.labels(ctx.route))
        children[0].inc()
        children[1].observe(elapsed)
        self.recent.append((now, elapsed))

    def p99_ms(self, window_s: float = 60.0) -> float | None:
        """This process's p99 request latency over the last minute (for system.high_latency)."""
        horizon = time.perf_counter() - window_s
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()
        if len(self.recent) < 20:
            return None
        values = sorted(d for _, d in self.recent)
        return values[min(len(values) - 1, int(len(values) * 0.99))] * 1000

    def decision(self, endpoint: str, decision: str, reason: str) -> None:
        key = (endpoint, decision, reason)
        if not self.multiprocess:
            self._decision_counts[key] = self._decision_counts.get(key, 0) + 1
            return
        child = self._decisions.get(key)
        if child is None:  # as for requests: each labelled child is looked up once
            child = self._decisions[key] = self.decisions.labels(endpoint, decision, reason)
        child.inc()

    def flush(self) -> None:
        """Move what the hot path counted since the last flush into the registry's collectors."""
        with self._flush_lock:
            moved = self._moved
            # list(d.items()) copies under the GIL in one step: the loop thread cannot change it midway
            for key, total in list(self._request_counts.items()):
                done = moved.get(("r", key), 0)
                if total > done:
                    self.requests.labels(key[0], key[1], str(key[2])).inc(total - done)
                    moved[("r", key)] = total
            for key, total in list(self._decision_counts.items()):
                done = moved.get(("d", key), 0)
                if total > done:
                    self.decisions.labels(*key).inc(total - done)
                    moved[("d", key)] = total
            for route, counts in list(self._latency_counts.items()):
                now = list(counts)
                done = moved.get(("l", route))
                if done == now:
                    continue
                child = self.latency.labels(route)
                for i, (n, m) in enumerate(zip(now[:-1], done or [0] * (len(now) - 1))):
                    if n > m:
                        child._buckets[i].inc(n - m)  # Histogram.observe's own step, in bulk
                child._sum.inc(now[-1] - (done[-1] if done else 0.0))
                moved[("l", route)] = now

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
