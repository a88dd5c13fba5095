"""The request, latency and decision metrics are counted in plain dicts on the hot path and moved into the
Prometheus registry when it is read (cycles.server.metrics): /metrics must still show exactly the requests
made, scrape after scrape, on every store, and a reader on another thread must neither lose nor double a
count."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cycles.server.metrics import Metrics
from support import Tenant, reserve_body

USD = "USD_MICROCENTS"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape(tenant: Tenant) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return _samples(httpx.get(tenant.server.base_url + "/metrics").text)


def _requests(s: dict, route: str, status: int) -> float:
    return s.get(("cycles_http_requests_total", (("method", "POST"), ("route", route), ("status", str(status)))), 0)


def _latency_count(s: dict, route: str) -> float:
    return s.get(("cycles_http_request_duration_seconds_count", (("route", route),)), 0)


def _allowed(s: dict) -> float:
    return s.get(("cycles_decisions_total", (("decision", "ALLOW"), ("endpoint", "reserve"), ("reason", "ALLOW"))), 0)


def test_metrics_equal_the_requests_made_across_scrapes(tenant: Tenant) -> None:
    tenant.budget()
    before = _scrape(tenant)
    rids = []
    with tenant.client() as c:
        for _ in range(7):
            r = c.post("/v1/reservations", json=reserve_body(tenant, 10))
            assert r.status_code == 200, r.text
            rids.append(r.json()["reservation_id"])
        for _ in range(3):
            assert c.post("/v1/reservations", json={"idempotency_key": uuid.uuid4().hex}).status_code == 400
    first = _scrape(tenant)
    assert _requests(first, "createReservation", 200) - _requests(before, "createReservation", 200) == 7
    assert _requests(first, "createReservation", 400) - _requests(before, "createReservation", 400) == 3
    assert _latency_count(first, "createReservation") - _latency_count(before, "createReservation") == 10
    assert _allowed(first) - _allowed(before) == 7
    again = _scrape(tenant)  # a scrape with no requests between: nothing moves twice
    for key in [k for k in first if k[0].startswith(("cycles_http_request", "cycles_decisions"))]:
        assert again[key] == first[key], key
    with tenant.client() as c:
        for rid in rids[:5]:
            r = c.post(f"/v1/reservations/{rid}/commit",
                       json={"idempotency_key": uuid.uuid4().hex, "actual": {"unit": USD, "amount": 5}})
            assert r.status_code == 200, r.text
    third = _scrape(tenant)
    assert _requests(third, "commitReservation", 200) - _requests(before, "commitReservation", 200) == 5
    assert _latency_count(third, "commitReservation") - _latency_count(before, "commitReservation") == 5
    assert _requests(third, "createReservation", 200) == _requests(first, "createReservation", 200)
    inf = ("cycles_http_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "commitReservation")))
    assert third[inf] == _latency_count(third, "commitReservation")  # the buckets add up to the count
    assert third[("cycles_http_request_duration_seconds_sum", (("route", "commitReservation"),))] > 0


class _Ctx:
    def __init__(self, route: str, started: float) -> None:
        self.route, self.started = route, started


def test_buckets_match_histogram_observe_and_a_reader_thread_loses_nothing() -> None:
    metrics = Metrics()
    assert not metrics.multiprocess
    now = time.perf_counter()
    metrics.observe(_Ctx("r", now - 0.3), "POST", 200)  # 0.3 s and a little: the 0.5 bucket
    metrics.observe(_Ctx("r", now - 1.5), "POST", 200)  # the 2.5 bucket
    metrics.observe(_Ctx("r", now - 10), "POST", 500)  # above every bound: +Inf only
    get = metrics.registry.get_sample_value  # a registry read moves the counts first
    bucket = "cycles_http_request_duration_seconds_bucket"
    assert get(bucket, {"route": "r", "le": "0.25"}) == 0
    assert get(bucket, {"route": "r", "le": "0.5"}) == 1
    assert get(bucket, {"route": "r", "le": "1.0"}) == 1
    assert get(bucket, {"route": "r", "le": "2.5"}) == 2
    assert get(bucket, {"route": "r", "le": "+Inf"}) == 3
    assert 11.8 < get("cycles_http_request_duration_seconds_sum", {"route": "r"}) < 13
    assert get("cycles_http_requests_total", {"route": "r", "method": "POST", "status": "500"}) == 1

    stop = threading.Event()

    def scrape() -> None:  # as the separate metrics port does, from its own thread
        while not stop.is_set():
            metrics.registry.get_sample_value("cycles_http_requests_total", {"route": "t", "method": "POST",
                                                                             "status": "200"})

    reader = threading.Thread(target=scrape)
    reader.start()
    try:
        for i in range(60_000):
            metrics.observe(_Ctx("t", time.perf_counter()), "POST", 200)
            metrics.decision("reserve", "ALLOW", "ALLOW")
    finally:
        stop.set()
        reader.join()
    assert get("cycles_http_requests_total", {"route": "t", "method": "POST", "status": "200"}) == 60_000
    assert get("cycles_http_request_duration_seconds_count", {"route": "t"}) == 60_000
    assert get("cycles_decisions_total", {"endpoint": "reserve", "decision": "ALLOW", "reason": "ALLOW"}) == 60_000
