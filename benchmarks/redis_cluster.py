#!/usr/bin/env python3
"""The Redis store on 1, 2 and 3 Redis Cluster shards: throughput, Redis CPU per operation per shard, and
how tenants spread over the shards (docs/redis.md "Redis Cluster", scaling).

For each shard count it starts that many redis-server primaries in cluster mode on loopback (no replicas:
they would only add replication CPU to the figures), splits the 16384 slots evenly (CLUSTER ADDSLOTSRANGE,
CLUSTER MEET), provisions --tenants tenants with a budget each through the store, then runs
reserve + commit pairs from --drivers driver processes (each an asyncio loop with --concurrency callers
on RedisClusterStore, the server's own store class) for --seconds. A single `redis://` primary with the
same drivers is the baseline. It prints, per run: scripts/s, the Redis CPU time per script on each shard
(from /proc, user + system), each shard's share of the scripts and of the tenants, and the busiest
shard's CPU use.

On a 2-core machine the drivers (Python) saturate the cores long before the shards do, so absolute
throughput here is the drivers' ceiling; the Redis CPU per script and the spread are what carry over to
bigger machines (docs/redis.md extrapolates them). Loopback only; every step is bounded.

    .venv/bin/python benchmarks/redis_cluster.py [--seconds 8] [--tenants 64] [--drivers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

TICK = os.sysconf("SC_CLK_TCK")
USD = "USD_MICROCENTS"


def free_port_pair() -> int:
    for _ in range(200):
        port = random.randint(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def start_nodes(n: int, cluster: bool, tmp: Path) -> list[tuple[int, subprocess.Popen]]:
    exe = shutil.which("redis-server") or sys.exit("redis-server is not installed")
    nodes = []
    for i in range(n):
        port = free_port_pair()
        d = tmp / f"n{n}-{i}-{cluster}"
        d.mkdir()
        args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(d), "--protected-mode", "no"]
        if cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        nodes.append((port, proc))
    for port, _ in nodes:
        for _ in range(200):
            try:
                redis.Redis(port=port).ping()
                break
            except redis.RedisError:
                time.sleep(0.05)
    if cluster:
        per = 16384 // n
        for i, (port, _) in enumerate(nodes):
            r = redis.Redis(port=port)
            hi = 16383 if i == n - 1 else (i + 1) * per - 1
            r.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, hi)
            if i:
                r.execute_command("CLUSTER", "MEET", "127.0.0.1", nodes[0][0])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [redis.Redis(port=p).cluster("INFO") for p, _ in nodes]
            if all(i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == n for i in infos):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("cluster did not become ok")
        time.sleep(0.5)
    return nodes


def tenant_ids(count: int) -> list[str]:
    return [f"b-{i:04d}-{secrets.token_hex(3)}" for i in range(count)]


def open_store(url: str):
    if url.startswith("redis-cluster://"):
        from cycles.store.redis_cluster import RedisClusterStore

        return RedisClusterStore(url, max_connections=64)
    from cycles.store.redis import RedisStore

    return RedisStore(url, max_connections=64)


async def provision(url: str, tenants: list[str]) -> None:
    store = open_store(url)
    for t in tenants:
        await store.create_tenant({"tenant_id": t, "name": t, "status": "ACTIVE"})
        await store.create_budget({"tenant_id": t, "scope": f"tenant:{t}", "unit": USD, "allocated": 10**17})
    await store.close()


async def drive(url: str, tenants: list[str], concurrency: int, seconds: float) -> int:
    from cycles.store.base import ReserveCommand, SettleCommand

    store = open_store(url)
    done = 0
    stop = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < stop:
            t = random.choice(tenants)
            k = secrets.token_hex(8)
            out = await store.reserve(ReserveCommand(
                tenant=t, endpoint="reserve", idempotency_key=k, payload_hash="h" + k, subject={"tenant": t},
                action={"kind": "llm", "name": "m"}, unit=USD, amount=10, scope_path=f"tenant:{t}",
                scopes=[f"tenant:{t}"], ttl_ms=60_000))
            k2 = secrets.token_hex(8)
            await store.commit(SettleCommand(tenant=t, reservation_id=out.result["reservation_id"],
                                             idempotency_key=k2, payload_hash="h" + k2, actual=7, unit=USD))
            done += 2

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    await store.close()
    return done


def driver(url: str, tenants: list[str], concurrency: int, seconds: float, q: multiprocessing.Queue) -> None:
    q.put(asyncio.run(drive(url, tenants, concurrency, seconds)))


def run(shards: int, cluster: bool, args: argparse.Namespace, tmp: Path) -> dict:
    nodes = start_nodes(shards, cluster, tmp)
    try:
        if cluster:
            url = "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p, _ in nodes) + "/"
        else:
            url = f"redis://127.0.0.1:{nodes[0][0]}/0"
        tenants = tenant_ids(args.tenants)
        asyncio.run(provision(url, tenants))
        # which shard serves each tenant (its hash tag's slot)
        owner: dict[str, int] = {}
        if cluster:
            from redis.cluster import ClusterNode, RedisCluster

            rc = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p, _ in nodes])
            for t in tenants:
                owner[t] = rc.get_node_from_key(f"cy:{{{t}}}:tenant").port
            rc.close()
        else:
            owner = {t: nodes[0][0] for t in tenants}
        stats0 = {p: int(redis.Redis(port=p).info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
                  for p, _ in nodes}
        ticks0 = {p: cpu_ticks(proc.pid) for p, proc in nodes}
        q: multiprocessing.Queue = multiprocessing.Queue()
        procs = [multiprocessing.Process(target=driver, args=(url, tenants, args.concurrency, args.seconds, q))
                 for _ in range(args.drivers)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        ops = sum(q.get(timeout=args.seconds + 60) for _ in procs)
        for p in procs:
            p.join(30)
        wall = time.monotonic() - t0
        out = {"mode": "cluster" if cluster else "single", "shards": shards, "ops": ops, "seconds": round(wall, 2),
               "ops_per_s": round(ops / wall), "per_shard": []}
        for p, proc in nodes:
            cpu_s = (cpu_ticks(proc.pid) - ticks0[p]) / TICK
            calls = int(redis.Redis(port=p).info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)) - stats0[p]
            out["per_shard"].append({
                "port": p, "tenants": sum(1 for t in tenants if owner[t] == p), "scripts": calls,
                "cpu_s": round(cpu_s, 2), "cpu_us_per_script": round(cpu_s * 1e6 / max(calls, 1), 1),
                "cpu_busy_pct": round(100 * cpu_s / wall, 1)})
        return out
    finally:
        for _, proc in nodes:
            proc.terminate()
        for _, proc in nodes:
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--tenants", type=int, default=64)
    ap.add_argument("--drivers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for shards, cluster in ((1, False), (1, True), (2, True), (3, True)):
            r = run(shards, cluster, args, tmp)
            results.append(r)
            spread = " ".join(f"{s['tenants']}t/{s['scripts']}s/{s['cpu_us_per_script']}us/{s['cpu_busy_pct']}%"
                              for s in r["per_shard"])
            print(f"{r['mode']:7} shards={shards}  {r['ops_per_s']:>6} scripts/s   per shard "
                  f"(tenants/scripts/Redis CPU per script/busy): {spread}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
