"""Operations surface: OpenAPI covers every served route, the docs page works offline, metrics count."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from support import Server, new_tenant, reserve_body, start_server


def test_openapi_describes_every_route(server: Server) -> None:
    from cycles.server.app import create_app
    from cycles.store.sqlite import SQLiteStore

    spec = httpx.get(server.base_url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    app = create_app(SQLiteStore(":memory:"))
    served = set()
    for route in app.routes:
        methods = getattr(route, "methods", None)
        if methods is None:  # the mounted swagger assets
            continue
        for method in methods - {"HEAD"}:
            served.add((route.path, method.lower()))
    described = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert served == described
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    for path, item in spec["paths"].items():
        for op in item.values():
            for ref in re.findall(r'"\$ref": "#/components/schemas/(\w+)"', str(op).replace("'", '"')):
                assert ref in spec["components"]["schemas"], (path, ref)


def test_docs_page_is_self_contained(server: Server) -> None:
    page = httpx.get(server.base_url + "/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text
    for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', page.text):
        r = httpx.get(server.base_url + asset)
        assert r.status_code == 200 and len(r.content) > 1000, asset


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _exercise(srv: Server) -> None:
    t = new_tenant(srv)
    t.budget("", 1_000)
    with t.client() as c:
        assert c.post("/v1/reservations", json=reserve_body(t, 600)).status_code == 200
        assert c.post("/v1/reservations", json=reserve_body(t, 600)).status_code == 409
        assert c.post("/v1/reservations", json=reserve_body(t, 600, dry_run=True)).status_code == 200


def test_metrics_count_requests_decisions_and_active(server: Server) -> None:
    before = httpx.get(server.base_url + "/metrics").text
    _exercise(server)
    text = httpx.get(server.base_url + "/metrics").text
    assert _metric(text, "cycles_http_requests_total", route="createReservation", status="200") - \
        _metric(before, "cycles_http_requests_total", route="createReservation", status="200") == 2
    assert _metric(text, "cycles_decisions_total", endpoint="reserve", decision="DENY", reason="BUDGET_EXCEEDED") - \
        _metric(before, "cycles_decisions_total", endpoint="reserve", decision="DENY", reason="BUDGET_EXCEEDED") == 1
    assert _metric(text, "cycles_decisions_total", endpoint="dry_run", decision="DENY") >= 1
    assert _metric(text, "cycles_http_request_duration_seconds_count", route="createReservation") >= 3
    assert _metric(text, "cycles_active_reservations") >= 1


@pytest.mark.slow
def test_metrics_sum_over_workers(tmp_path: Path, store_kind: str) -> None:
    if store_kind != "sqlite":
        pytest.skip("multi-worker layout of the embedded store")
    srv = start_server(f"sqlite:///{tmp_path / 'm.db'}", tmp_path, workers=2)
    try:
        for _ in range(3):
            _exercise(srv)
        text = httpx.get(srv.base_url + "/metrics").text
        # whichever worker answers the scrape reports the requests of both
        assert _metric(text, "cycles_http_requests_total", route="createReservation") == 9
        assert _metric(text, "cycles_active_reservations") == 3
    finally:
        srv.stop()


def test_every_response_carries_correlation_headers(server: Server) -> None:
    for method, path in (("GET", "/actuator/health"), ("GET", "/v1/balances"), ("POST", "/v1/reservations"),
                         ("GET", "/nowhere")):
        r = httpx.request(method, server.base_url + path)
        assert r.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-cycles-trace-id"])
