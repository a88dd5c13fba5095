"""A separate OS process for the restart / concurrent-replay recovery scenarios. Only durable state (the
journal directory) crosses the process boundary. Params: one JSON argument. Prints one JSON line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from faults import FaultTransport, Script  # noqa: E402

from cycles.client import CyclesClient, CyclesConfig, cycles  # noqa: E402


class Observing(FaultTransport):
    """Snapshots the journal directory at the moment each settlement request is about to leave."""

    def __init__(self, script, journal_dir: Path, snapshot_to: str | None, barrier: tuple[str, int] | None):
        super().__init__(script)
        self.journal_dir = journal_dir
        self.snapshot_to = snapshot_to
        self.barrier = barrier
        self.times: list[tuple[str, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        from faults import op_of

        op = op_of(request)
        if self.barrier is not None:
            # Every child has read the journal before any settles: a start time would not hold on a loaded machine.
            directory, count = Path(self.barrier[0]), self.barrier[1]
            (directory / str(os.getpid())).touch()
            deadline = time.monotonic() + 60
            while len(list(directory.iterdir())) < count and time.monotonic() < deadline:
                time.sleep(0.01)
            self.barrier = None
        if op in ("commit", "event") and self.snapshot_to:
            files = {}
            for p in self.journal_dir.rglob("*"):
                if p.is_file():
                    files[str(p.relative_to(self.journal_dir))] = p.read_text(errors="replace")
            Path(self.snapshot_to).write_text(json.dumps({"op": op, "files": files}))
        self.times.append((op, int(time.time() * 1000)))
        return super().handle_request(request)


def main() -> None:
    p = json.loads(sys.argv[1])
    cfg = CyclesConfig(base_url=p["base_url"], api_key=p["api_key"], tenant=p.get("tenant"),
                       journal_dir=p["journal_dir"], retry_initial_delay=0.05, retry_max_delay=0.2,
                       retry_enabled=p.get("retry_enabled", True), journal_replay=False, heartbeat_enabled=False)
    script = Script([tuple(r) for r in p.get("rules", [])])
    transport = Observing(script, Path(p["journal_dir"]), p.get("snapshot_to"),
                          tuple(p["barrier"]) if p.get("barrier") else None)
    client = CyclesClient(cfg, transport=transport)
    out: dict = {}
    if p["mode"] == "guarded":
        @cycles(p["estimate"], actual=p["actual"], client=client, idempotency_key=p["key"], action_kind="llm",
                action_name="child")
        def work():
            return "ok"

        out["result"] = work()
        if p.get("exit_now"):
            print(json.dumps({"result": out["result"], "seen": [s.__dict__ for s in script.seen]}), flush=True)
            os._exit(0)  # terminated right after the journal write; no flush, no atexit
    elif p["mode"] == "replay":
        report = client.recover_pending(timeout=p.get("timeout", 20))
        out["settled"] = [(o.reservation_id, o.mode) for o in report.settled]
        out["rejected"] = [(o.reservation_id, o.mode) for o in report.rejected]
        out["unresolved"] = [(o.reservation_id, o.mode, str(o.error)) for o in report.unresolved]
        out["quarantined"] = report.quarantined
    out["seen"] = [s.__dict__ for s in script.seen]
    out["times"] = transport.times
    print(json.dumps(out), flush=True)
    client.close()


if __name__ == "__main__":
    main()
