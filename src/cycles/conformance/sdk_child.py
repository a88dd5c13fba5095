"""One SDK process for the restart and concurrent-replay scenarios: only the journal directory crosses the
process boundary. `python -m cycles.conformance.sdk_child '<json params>'`; prints one JSON line.

Modes: `guarded` runs one guarded action (reserve, act, commit `actual`); `replay` recovers the journal."""

from __future__ import annotations

import json
import os
import sys

from cycles.client import CyclesClient, CyclesConfig, cycles


def main() -> None:
    p = json.loads(sys.argv[1])
    cfg = CyclesConfig(base_url=p["base_url"], api_key=p["api_key"], tenant=p.get("tenant"),
                       journal_dir=p["journal_dir"], retry_initial_delay=0.05, retry_max_delay=0.2,
                       read_timeout=p.get("read_timeout", 10.0), journal_replay=False, heartbeat_enabled=False)
    client = CyclesClient(cfg)
    out: dict = {"pid": os.getpid()}
    if p["mode"] == "guarded":
        @cycles(p["estimate"], actual=p["actual"], client=client, idempotency_key=p["key"], action_kind="llm",
                action_name="conformance")
        def work() -> str:
            return "ok"

        out["result"] = work()
        if p.get("exit_now"):
            print(json.dumps(out), flush=True)
            os._exit(0)  # terminated right after the guarded call returned: no flush, no atexit
        out["flushed"] = client.flush(p.get("timeout", 10))
    else:
        report = client.recover_pending(timeout=p.get("timeout", 20))
        out["settled"] = [[o.reservation_id, o.mode] for o in report.settled]
        out["rejected"] = [[o.reservation_id, o.mode] for o in report.rejected]
        out["unresolved"] = [[o.reservation_id, o.mode, str(o.error)] for o in report.unresolved]
        out["quarantined"] = [str(q) for q in report.quarantined]
    print(json.dumps(out), flush=True)
    client.close()


if __name__ == "__main__":
    main()
