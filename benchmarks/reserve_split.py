#!/usr/bin/env python3
"""Where a fresh reserve's instructions go: the SQLite store alone against the whole in-process path.

`--mode store` calls `store.reserve` with prebuilt commands (group commits of 32, as under load); `--mode handler`
sends the same reserves through the ASGI app (dispatch, authentication through the governance cache, decode,
the store, render). Run as is, it does `--reserves` of them; with `--instructions` it runs itself under
`valgrind --tool=callgrind` at two sizes (300 and 1,300 reserves) for both modes and prints the instructions
per reserve, the difference divided by the 1,000 extra reserves (start-up and set-up cancel out), split into
SQLite's C code, CPython, libc and the rest. Instruction counts do not move with the machine's load, unlike
wall-clock figures on these shared 2-core machines.

  .venv/bin/python benchmarks/reserve_split.py --instructions          # ~2 min, needs valgrind
  .venv/bin/python benchmarks/reserve_split.py --mode handler --reserves 20000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


async def run(mode: str, reserves: int) -> None:
    import handler_micro as hm
    from cycles.server.app import create_app
    from cycles.store.base import ReserveCommand

    tmp = tempfile.mkdtemp(prefix="cycles-reserve-split-")
    app = create_app(store_url=f"sqlite:///{tmp}/cycles.db", admin_key=hm.ADMIN, sweep_interval_s=0, tune_gc=True)
    lifespan = app.router.lifespan_context(app.app)
    await lifespan.__aenter__()
    try:
        store = app.state.cycles.store
        admin = {"content-type": "application/json", "x-admin-api-key": hm.ADMIN}

        async def post(path: str, body: dict) -> dict:
            raw = json.dumps(body).encode()
            status, out = await hm.call(app, hm._scope(path, {**admin, "content-length": str(len(raw))}), raw)
            assert status < 300, out
            return json.loads(out)

        tenant = "split"
        await post("/v1/admin/tenants", {"tenant_id": tenant, "name": tenant})
        key = (await post("/v1/admin/api-keys", {"tenant_id": tenant, "name": "split", "permissions": [
            "reservations:create", "reservations:commit"]}))["key_secret"]
        await post("/v1/admin/budgets", {"tenant_id": tenant, "scope": f"tenant:{tenant}", "unit": "USD_MICROCENTS",
                                         "allocated": {"unit": "USD_MICROCENTS", "amount": 10 ** 15}})
        if mode == "store":
            gen = await store.governance_gen(tenant)
            scopes = [f"tenant:{tenant}", f"tenant:{tenant}/agent:a1"]
            cmds = [ReserveCommand(tenant=tenant, endpoint="reserve", idempotency_key=uuid.uuid4().hex,
                                   payload_hash="0" * 64, subject={"tenant": tenant, "agent": "a1"},
                                   action={"kind": "llm.completion", "name": "gpt"}, unit="USD_MICROCENTS", amount=1000,
                                   scope_path=scopes[-1], scopes=scopes, gen=gen) for _ in range(reserves)]
            for i in range(0, reserves, 32):
                await asyncio.gather(*(store.reserve(c) for c in cmds[i:i + 32]))
        else:
            hdr = {"content-type": "application/json", "x-cycles-api-key": key}
            items = []
            for _ in range(reserves):
                body = json.dumps({"idempotency_key": uuid.uuid4().hex, "subject": {"tenant": tenant, "agent": "a1"},
                                   "action": {"kind": "llm.completion", "name": "gpt"},
                                   "estimate": {"unit": "USD_MICROCENTS", "amount": 1000}}).encode()
                items.append((hm._scope("/v1/reservations", {**hdr, "content-length": str(len(body))}), body))
            _cpu, answers = await hm.batches(app, items, 32)
            assert all(status == 200 for status, _ in answers)
    finally:
        await lifespan.__aexit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)


def _self_costs(out_file: str) -> dict[str, int]:
    text = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", out_file],
                          capture_output=True, text=True, check=True).stdout
    costs: dict[str, int] = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(.*)$", line)
        if m and "PROGRAM TOTALS" not in m.group(2):
            costs[m.group(2)] += int(m.group(1).replace(",", ""))
    return costs


def _group(name: str) -> str:
    if "sqlite" in name.lower():
        return "SQLite"
    if "python3" in name or "libpython" in name or re.search(r"(Objects|Python|Modules|Parser)/", name):
        return "CPython"
    if "libc.so" in name or name.startswith("./"):
        return "libc"
    return "other"


def instructions() -> int:
    if not shutil.which("valgrind"):
        print("valgrind is required (apt-get install valgrind)")
        return 2
    tmp = tempfile.mkdtemp(prefix="cycles-reserve-split-cg-")
    try:
        runs = {}
        for mode in ("store", "handler"):
            for n in (300, 1300):
                out = os.path.join(tmp, f"{mode}-{n}.out")
                runs[(mode, n)] = (out, subprocess.Popen(
                    ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                     "--mode", mode, "--reserves", str(n)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for (mode, n), (_, proc) in runs.items():
            if proc.wait() != 0:
                print(f"the {mode} run of {n} reserves failed under valgrind")
                return 1
        print("| part | instructions per reserve | SQLite's C | CPython | libc | other |")
        print("|---|---:|---:|---:|---:|---:|")
        for mode, label in (("store", "the store's reserve alone"), ("handler", "the whole in-process reserve")):
            small, large = _self_costs(runs[(mode, 300)][0]), _self_costs(runs[(mode, 1300)][0])
            groups: dict[str, float] = collections.Counter()
            for name in set(small) | set(large):
                groups[_group(name)] += (large.get(name, 0) - small.get(name, 0)) / 1000
            total = sum(groups.values())
            print(f"| {label} | {total:,.0f} | {groups['SQLite']:,.0f} | {groups['CPython']:,.0f} | "
                  f"{groups['libc']:,.0f} | {groups['other']:,.0f} |")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("store", "handler"), default="handler")
    parser.add_argument("--reserves", type=int, default=2000)
    parser.add_argument("--instructions", action="store_true", help="both modes under callgrind, per-reserve split")
    args = parser.parse_args()
    if args.instructions:
        sys.exit(instructions())
    try:
        import uvloop

        uvloop.run(run(args.mode, args.reserves))
    except ImportError:
        asyncio.run(run(args.mode, args.reserves))
