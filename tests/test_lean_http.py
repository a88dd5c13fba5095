"""The direct path of the hot routes (cycles.server.lean) answers as uvicorn's path does: the same status line and
headers in the same order, the same body, keep-alive, `Connection: close` and pipelined requests. A query
string sends a hot-route request down uvicorn's path, so the two are compared on the same server."""

from __future__ import annotations

import json
import socket
import uuid
from typing import Any
from urllib.parse import urlparse

from support import Tenant, reserve_body


def _connect(tenant: Tenant) -> socket.socket:
    url = urlparse(tenant.server.base_url)
    return socket.create_connection((url.hostname, url.port), timeout=30)


def _request(tenant: Tenant, path: str, body: dict[str, Any], *, close: bool = False) -> bytes:
    raw = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"X-Cycles-API-Key: {tenant.key}\r\nContent-Length: {len(raw)}\r\n")
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + raw


def _responses(sock: socket.socket, count: int) -> list[tuple[str, list[tuple[str, str]], bytes]]:
    buf, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} responses"
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = [(n.lower(), v) for n, v in (line.split(": ", 1) for line in lines[1:])]
        length = int(dict(headers)["content-length"])
        while len(buf) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside a body"
            buf += chunk
        out.append((lines[0], headers, buf[:length]))
        buf = buf[length:]
    assert buf == b"", "more bytes than the responses announced"
    return out


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_direct_and_uvicorn_paths_answer_alike(tenant: Tenant) -> None:
    tenant.budget()
    body = reserve_body(tenant, 100)
    with _connect(tenant) as sock:
        sock.sendall(_request(tenant, "/v1/reservations", body))
        sock.sendall(_request(tenant, "/v1/reservations?via=uvicorn", body))  # the idempotent replay
        sock.sendall(_request(tenant, "/v1/reservations", {"idempotency_key": "x"}))  # 400
        sock.sendall(_request(tenant, "/v1/reservations?via=uvicorn", {"idempotency_key": "x"}))
        (s1, h1, b1), (s2, h2, b2), (s3, h3, b3), (s4, h4, b4) = _responses(sock, 4)
    assert s1 == s2 == "HTTP/1.1 200 OK" and s3 == s4 == "HTTP/1.1 400 Bad Request"
    assert [n for n, _ in h1] == [n for n, _ in h2] and [n for n, _ in h3] == [n for n, _ in h4]
    assert [n for n, _ in h1][:2] == ["date", "server"]  # uvicorn's default headers first, as uvicorn writes them
    first, replay = json.loads(b1), json.loads(b2)
    first.pop("remaining_ttl_ms"), replay.pop("remaining_ttl_ms")  # the one volatile field of a replay
    assert first == replay
    assert json.loads(b3)["message"] == json.loads(b4)["message"]
    assert dict(h1)["x-cycles-tenant"] == tenant.tenant_id and dict(h1)["x-request-id"] != dict(h2)["x-request-id"]


def test_keep_alive_pipelining_and_close_on_the_direct_path(tenant: Tenant) -> None:
    tenant.budget()
    with _connect(tenant) as sock:
        # three requests in one write: answered in order on the same connection
        sock.sendall(b"".join(_request(tenant, "/v1/reservations", reserve_body(tenant, 10)) for _ in range(3)))
        answers = _responses(sock, 3)
        assert [a[0] for a in answers] == ["HTTP/1.1 200 OK"] * 3
        rids = [json.loads(a[2])["reservation_id"] for a in answers]
        assert len(set(rids)) == 3
        sock.sendall(_request(tenant, f"/v1/reservations/{rids[0]}/commit",
                              {"idempotency_key": uuid.uuid4().hex, "actual": {"unit": "USD_MICROCENTS", "amount": 7}},
                              close=True))
        [(status, headers, _)] = _responses(sock, 1)
        assert status == "HTTP/1.1 200 OK" and ("connection", "close") in headers
        assert _closed(sock)
    assert tenant.balance()["spent"]["amount"] == 7


def test_the_direct_path_follows_uvicorns_date_header(tenant: Tenant) -> None:
    """uvicorn's default headers are joined once per list it builds (a new one each second): a cached block
    must not outlive the second it was made in."""
    import time

    tenant.budget()
    dates = []
    with _connect(tenant) as sock:
        for _ in range(2):
            sock.sendall(_request(tenant, "/v1/reservations", reserve_body(tenant, 1)))
            sock.sendall(_request(tenant, "/v1/reservations?via=uvicorn", reserve_body(tenant, 1)))
            (_, direct, _), (_, uvi, _) = _responses(sock, 2)
            dates.append((dict(direct)["date"], dict(uvi)["date"]))
            time.sleep(1.3)
    assert dates[0][0] != dates[1][0]  # the second round's date is its own
    assert all(len(d) == len(u) and d[:-9] == u[:-9] for d, u in dates)  # same day, same format as uvicorn's


def test_default_header_block_checks_values_and_connection_once() -> None:
    from cycles.server import lean

    ok = [(b"date", b"Thu, 03 Dec 2026 04:00:00 GMT"), (b"server", b"uvicorn")]
    _, invalid, close, joined = lean._default_head(ok)
    assert not invalid and not close
    assert joined == b"date: Thu, 03 Dec 2026 04:00:00 GMT\r\nserver: uvicorn\r\n"
    assert lean._default_head([(b"server", b"bad\nvalue")])[1] is True
    assert lean._default_head([*ok, (b"connection", b"Keep-Alive, Close")])[2] is True
