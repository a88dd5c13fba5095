#!/usr/bin/env python3
"""CPU per reserve and per commit of the handler path, without sockets or an HTTP server.

Calls the app's ASGI callable in process with prebuilt scopes (the hot routes' dispatch, the wrapped
endpoints, authentication through the governance cache, the store), `--concurrency` requests at a time so
SQLite's group commit batches them as under load. Prints µs of process CPU (time.process_time) per reserve
and per commit, and, in the same run, per request of a trivial ASGI app called the same way (the floor of
this harness: the asyncio task and the ASGI messages). Figures move less than wrk's because nothing else is
measured, but the machine's load still shows: compare runs made back to back, or use
`valgrind --tool=callgrind` on it for an instruction count that does not depend on load:

  .venv/bin/python benchmarks/handler_micro.py                       # SQLite, 4,000 cycles, best of 3
  .venv/bin/python benchmarks/handler_micro.py --store redis://127.0.0.1:6379/15 --cycles 2000
  valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out .venv/bin/python benchmarks/handler_micro.py \
      --cycles 1000 --rounds 1 && callgrind_annotate /tmp/cg.out | head -30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid

ADMIN = "handler-micro-admin-key-0123456789abcdef"


def _scope(path: str, headers: dict[str, str], method: str = "POST") -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 7878)}


async def call(app, scope: dict, body: bytes) -> tuple[int, bytes]:
    sent = False
    out: dict = {}

    async def receive() -> dict:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    chunks: list[bytes] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        else:
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return out["status"], b"".join(chunks)


async def trivial(scope: dict, receive, send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


async def batches(app, items: list[tuple[dict, bytes]], concurrency: int) -> tuple[float, list[tuple[int, bytes]]]:
    """CPU seconds to answer all `items`, `concurrency` at a time, and the answers."""
    answers: list[tuple[int, bytes]] = []
    t0 = time.process_time()
    for i in range(0, len(items), concurrency):
        answers += await asyncio.gather(*(call(app, s, b) for s, b in items[i:i + concurrency]))
    return time.process_time() - t0, answers


async def main(args: argparse.Namespace) -> dict:
    from cycles.server.app import create_app

    tmp = tempfile.mkdtemp(prefix="cycles-handler-micro-")
    url = args.store or f"sqlite:///{os.path.join(tmp, 'cycles.db')}"
    app = create_app(store_url=url, admin_key=ADMIN, sweep_interval_s=0, tune_gc=True)
    os.environ.setdefault("CYCLES_EMBEDDED_WORKER", "0")
    lifespan = app.router.lifespan_context(app.app)
    await lifespan.__aenter__()
    try:
        admin = {"content-type": "application/json", "x-admin-api-key": ADMIN}

        async def post(path: str, body: dict) -> dict:
            raw = json.dumps(body).encode()
            status, out = await call(app, _scope(path, {**admin, "content-length": str(len(raw))}), raw)
            assert status < 300, (path, status, out)
            return json.loads(out)

        tenant = "hm" + uuid.uuid4().hex[:8]
        await post("/v1/admin/tenants", {"tenant_id": tenant, "name": tenant})
        key = (await post("/v1/admin/api-keys", {"tenant_id": tenant, "name": "hm", "permissions": [
            "reservations:create", "reservations:commit"]}))["key_secret"]
        await post("/v1/admin/budgets", {"tenant_id": tenant, "scope": f"tenant:{tenant}", "unit": "USD_MICROCENTS",
                                         "allocated": {"unit": "USD_MICROCENTS", "amount": 10 ** 15}})
        hdr = {"content-type": "application/json", "x-cycles-api-key": key}
        results: dict[str, list[float]] = {"floor": [], "reserve": [], "commit": []}
        for _ in range(args.rounds):
            floor = [(_scope("/", {"content-length": "0"}), b"") for _ in range(args.cycles)]
            cpu, _ = await batches(trivial, floor, args.concurrency)
            results["floor"].append(cpu / args.cycles * 1e6)
            reserves = []
            for _ in range(args.cycles):
                body = json.dumps({"idempotency_key": uuid.uuid4().hex, "subject": {"tenant": tenant, "agent": "a1"},
                                   "action": {"kind": "llm.completion", "name": "gpt"},
                                   "estimate": {"unit": "USD_MICROCENTS", "amount": 1000}}).encode()
                reserves.append((_scope("/v1/reservations", {**hdr, "content-length": str(len(body))}), body))
            cpu, answers = await batches(app, reserves, args.concurrency)
            bad = [a for a in answers if a[0] != 200]
            assert not bad, bad[:2]
            results["reserve"].append(cpu / args.cycles * 1e6)
            commits = []
            for _status, out in answers:
                rid = json.loads(out)["reservation_id"]
                body = json.dumps({"idempotency_key": uuid.uuid4().hex,
                                   "actual": {"unit": "USD_MICROCENTS", "amount": 900}}).encode()
                commits.append((_scope(f"/v1/reservations/{rid}/commit", {**hdr, "content-length": str(len(body))}),
                                body))
            cpu, answers = await batches(app, commits, args.concurrency)
            bad = [a for a in answers if a[0] != 200]
            assert not bad, bad[:2]
            results["commit"].append(cpu / args.cycles * 1e6)
        return {name: min(values) for name, values in results.items()}
    finally:
        await lifespan.__aexit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="store URL (default: a fresh SQLite file)")
    parser.add_argument("--cycles", type=int, default=4000, help="reserves (then commits) per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best of each figure is printed")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    out = asyncio.run(main(args))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"reserve {out['reserve']:.1f} µs CPU, commit {out['commit']:.1f} µs CPU, "
              f"trivial ASGI floor {out['floor']:.1f} µs CPU per request (best of {args.rounds}, "
              f"{args.cycles} each, {args.concurrency} at a time)")
    sys.exit(0)
