#!/usr/bin/env python3
"""Time the SQLite store's reserve and commit transactions directly, without HTTP.

Splits each transaction into BEGIN IMMEDIATE, the statements, and COMMIT (which in WAL mode writes
the dirty pages to the WAL and, every `wal_autocheckpoint` pages, runs a checkpoint that copies the
WAL into the database file and fdatasyncs both). Counts WAL frames per transaction. Variants set the
PRAGMAs the server does not set today, to show what they would change.

  .venv/bin/python benchmarks/store_micro.py                 # all variants, 3000 cycles each
  .venv/bin/python benchmarks/store_micro.py --cycles 10000 --variant default
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid

from cycles.store.base import ReserveCommand, SettleCommand
from cycles.store.sqlite import SQLiteStore

VARIANTS = {
    "default": [],
    "synchronous=OFF": ["PRAGMA synchronous=OFF"],
    "no autocheckpoint": ["PRAGMA wal_autocheckpoint=0"],
    "cache_size=64MB": ["PRAGMA cache_size=-65536"],
}


class Timed(sqlite3.Connection):
    """A connection that times BEGIN IMMEDIATE and COMMIT separately from everything else."""

    timings: dict[str, list[float]]

    def execute(self, sql: str, *args):  # type: ignore[override]
        t0 = time.perf_counter()
        try:
            return super().execute(sql, *args)
        finally:
            if sql in ("BEGIN IMMEDIATE", "COMMIT") and hasattr(self, "timings"):
                self.timings[sql].append(time.perf_counter() - t0)


async def run(variant: str, cycles: int, levels: int) -> dict[str, float]:
    tmp = tempfile.mkdtemp(prefix="cycles-store-micro-")
    real_connect = sqlite3.connect
    sqlite3.connect = lambda *a, **kw: real_connect(*a, factory=Timed, **kw)  # type: ignore[assignment]
    try:
        store = SQLiteStore(os.path.join(tmp, "cycles.db"))
        conn = store.conn
    finally:
        sqlite3.connect = real_connect  # type: ignore[assignment]
    for pragma in VARIANTS[variant]:
        conn.execute(pragma)
    await store.create_tenant({"tenant_id": "bench", "status": "ACTIVE", "name": "bench"})
    subject = {"tenant": "bench", "workspace": "ws", "agent": "a"} if levels == 3 else {"tenant": "bench"}
    scopes, path = [], ""
    for level, value in subject.items():
        path = f"{path}/{level}:{value}" if path else f"{level}:{value}"
        scopes.append(path)
    for scope in scopes:
        await store.create_budget({"tenant_id": "bench", "scope": scope, "unit": "USD_MICROCENTS", "allocated": 10**15})
    conn.timings = {"BEGIN IMMEDIATE": [], "COMMIT": []}  # type: ignore[attr-defined]
    frames_before = _wal_frames(conn)
    reserve, commit = [], []
    pc = time.perf_counter
    t_start = pc()
    for _ in range(cycles):
        cmd = ReserveCommand(
            tenant="bench", endpoint="reserve", idempotency_key=str(uuid.uuid4()), payload_hash="0" * 64,
            subject=subject, action={"kind": "llm.completion", "name": "gpt-4o"}, unit="USD_MICROCENTS",
            amount=1000, scope_path=scopes[-1], scopes=scopes, ttl_ms=60_000, overage_policy="ALLOW_IF_AVAILABLE")
        t0 = pc()
        out = await store.reserve(cmd)
        t1 = pc()
        await store.commit(SettleCommand(tenant="bench", reservation_id=out.result["reservation_id"],
                                         idempotency_key=str(uuid.uuid4()), payload_hash="0" * 64, actual=700,
                                         unit="USD_MICROCENTS"))
        t2 = pc()
        reserve.append(t1 - t0)
        commit.append(t2 - t1)
    elapsed = pc() - t_start
    frames = _wal_frames(conn) - frames_before if variant == "no autocheckpoint" else None
    timings = conn.timings  # type: ignore[attr-defined]
    db_mb = os.path.getsize(os.path.join(tmp, "cycles.db")) / 1e6
    await store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    txns = 2 * cycles
    return {
        "cycles_per_s": cycles / elapsed,
        "reserve_mean_us": statistics.mean(reserve) * 1e6, "reserve_p50_us": _q(reserve, 50),
        "reserve_p99_us": _q(reserve, 99), "reserve_max_us": max(reserve) * 1e6,
        "commit_mean_us": statistics.mean(commit) * 1e6, "commit_p50_us": _q(commit, 50),
        "commit_p99_us": _q(commit, 99),
        "begin_share": sum(timings["BEGIN IMMEDIATE"]) / elapsed,
        "commit_stmt_share": sum(timings["COMMIT"]) / elapsed,
        "commit_stmt_mean_us": sum(timings["COMMIT"]) / txns * 1e6,
        "commit_stmt_p50_us": _q(timings["COMMIT"], 50), "commit_stmt_max_us": max(timings["COMMIT"]) * 1e6,
        "slow_commits_over_2ms": sum(1 for t in timings["COMMIT"] if t > 0.002),
        "wal_frames_per_txn": frames / txns if frames is not None else float("nan"),
        "db_mb": db_mb,
    }


def _wal_frames(conn: sqlite3.Connection) -> int:
    """Frames in the WAL file: (size - 32-byte header) / (24-byte frame header + page). Meaningful as a
    per-transaction count only without checkpoints, which restart the WAL."""
    path = conn.execute("PRAGMA database_list").fetchone()[2] + "-wal"
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    try:
        return max(0, (os.path.getsize(path) - 32) // (24 + page))
    except OSError:
        return 0


def _q(values: list[float], pct: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(pct / 100 * len(s)))] * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=3000)
    p.add_argument("--levels", type=int, choices=(1, 3), default=1)
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="repeatable; default all")
    args = p.parse_args()
    print(f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}, {args.cycles} reserve+commit cycles, "
          f"{args.levels}-level subject, one connection, no HTTP\n")
    print("| variant | cycles/s | reserve p50 / p99 / max µs | commit p50 / p99 µs | COMMIT stmt mean / p50 / max µs "
          "| COMMITs > 2 ms | time in COMMIT | WAL frames/txn | db MB |")
    print("|---|---:|---|---|---|---:|---:|---:|---:|")
    for variant in args.variant or list(VARIANTS):
        r = asyncio.run(run(variant, args.cycles, args.levels))
        print(f"| {variant} | {r['cycles_per_s']:,.0f} | {r['reserve_p50_us']:.0f} / {r['reserve_p99_us']:,.0f} / "
              f"{r['reserve_max_us']:,.0f} | {r['commit_p50_us']:.0f} / {r['commit_p99_us']:,.0f} "
              f"| {r['commit_stmt_mean_us']:.0f} / {r['commit_stmt_p50_us']:.0f} / {r['commit_stmt_max_us']:,.0f} "
              f"| {r['slow_commits_over_2ms']} | {100 * r['commit_stmt_share']:.0f}% "
              f"| {r['wal_frames_per_txn']:.1f} | {r['db_mb']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
