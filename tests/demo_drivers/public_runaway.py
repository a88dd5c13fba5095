"""The public runaway demo's guarded agent, driven with the PUBLISHED runcycles 0.5.3 SDK.

Mirrors `agent/guarded.py` of the public demo (clients.md §5.1): the configuration comes from
CYCLES_BASE_URL, CYCLES_API_KEY and CYCLES_TENANT; the subject is workspace/app/workflow "default" and
agent "support-bot"; three `@cycles(estimate=1_000_000, action_kind="llm.completion", ...)` functions with
no `actual`; one `except BudgetExceededError`. The only change is the simulated latency
(DEMO_CALL_LATENCY_S, default 0.05 s), so the test is quick.

Prints one line: "@@DEMO-RESULT@@ " + JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
import time

if importlib.util.find_spec("cycles") is not None:  # pragma: no cover - environment guard
    raise SystemExit("our cycles package is importable here; this driver must use the published SDK only")

import runcycles  # noqa: E402
from runcycles import (BudgetExceededError, CyclesClient, CyclesConfig, CyclesError, cycles,  # noqa: E402
                       set_default_client)

if runcycles.__version__ != "0.5.3":  # pragma: no cover - environment guard
    raise SystemExit(f"expected runcycles 0.5.3, found {runcycles.__version__}")

COST_PER_CALL_MICROCENTS = 1_000_000
CALL_LATENCY_S = float(os.environ.get("DEMO_CALL_LATENCY_S", "0.05"))
MAX_CALLS = 1000  # a safety stop: a server that never says no cannot make the driver spin forever

executions = 0
rng = random.Random(4521)


def simulate() -> None:
    global executions
    time.sleep(CALL_LATENCY_S)
    executions += 1


@cycles(estimate=COST_PER_CALL_MICROCENTS, action_kind="llm.completion", action_name="draft-response")
def draft_response(ticket: str) -> str:
    simulate()
    return f"draft for {ticket}"


@cycles(estimate=COST_PER_CALL_MICROCENTS, action_kind="llm.completion", action_name="evaluate-quality")
def evaluate_quality(draft: str) -> float:
    simulate()
    return rng.uniform(5.5, 6.9)


@cycles(estimate=COST_PER_CALL_MICROCENTS, action_kind="llm.completion", action_name="refine-response")
def refine_response(draft: str, score: float) -> str:
    simulate()
    return draft


def main() -> dict:
    set_default_client(CyclesClient(CyclesConfig(
        base_url=os.environ["CYCLES_BASE_URL"], api_key=os.environ["CYCLES_API_KEY"],
        tenant=os.environ["CYCLES_TENANT"], workspace="default", app="default", workflow="default",
        agent="support-bot")))
    successes = 0
    outcome: dict = {"type": None}
    try:
        draft = draft_response("#4521")
        successes += 1
        while successes < MAX_CALLS:
            score = evaluate_quality(draft)
            successes += 1
            if score >= 8.0:
                break
            draft = refine_response(draft, score)
            successes += 1
    except BudgetExceededError as exc:
        outcome = {"type": type(exc).__name__, "status": getattr(exc, "status", None),
                   "error_code": getattr(exc, "error_code", None), "request_id": getattr(exc, "request_id", None),
                   "message": str(exc)}
    except CyclesError as exc:
        outcome = {"type": type(exc).__name__, "message": str(exc), "status": getattr(exc, "status", None),
                   "error_code": getattr(exc, "error_code", None)}
    return {"successes": successes, "executions": executions, "stop": outcome}


if __name__ == "__main__":
    result = main()
    sys.stdout.write("@@DEMO-RESULT@@ " + json.dumps(result) + "\n")
    sys.stdout.flush()
