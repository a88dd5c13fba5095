"""`cycles demo runaway`: the same agent with the same bug, unguarded and under Cycles.

A support bot drafts a reply, then loops evaluate -> refine until the quality score reaches 8.0. The
bug: the evaluator only ever returns 5.5..6.9, so the loop never ends. Every simulated LLM call takes
~50 ms and costs $0.01 (1,000,000 USD_MICROCENTS).

* Unguarded, nothing stops it but the demo's time limit (30 s by default: about 600 calls, about $6).
* Guarded, the three LLM functions carry `@cycles(estimate=1_000_000, ...)` and the agent has a $1.00
  budget at every scope from tenant to agent. Calls 1..100 are reserved and committed; the 101st
  reservation is refused by the server with 409 BUDGET_EXCEEDED, the SDK raises BudgetExceededError
  before the function body runs, and the agent stops cleanly at exactly $1.00.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rich import box
from rich.columns import Columns
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..client import (BudgetExceededError, CyclesClient, CyclesConfig, CyclesError, cycles, get_cycles_context,
                      set_default_client)
from .backend import CENT, DOLLAR, DemoBackend, money
from .ui import balance_table, kv, live

COST_PER_CALL_MICROCENTS = CENT      # $0.01 per simulated LLM call
CALL_LATENCY_S = 0.050               # ~50 ms per simulated LLM call
QUALITY_TARGET = 8.0
BUDGET_MICROCENTS = DOLLAR           # $1.00 at every scope, tenant .. agent
MARKS = (10 * CENT, 50 * CENT, DOLLAR, 5 * DOLLAR)
REAL_LLM_DOLLARS_PER_S = 0.03        # a real agent on a large model: ~$108/hour
SAFETY_CAP_CALLS = 100_000           # a broken budget can never make the guarded demo spin forever


@dataclass(frozen=True)
class Ticket:
    id: str
    customer: str
    subject: str


TICKET = Ticket("#4521", "Dana Whitfield", "Charged twice for the March invoice")


# ---------------------------------------------------------------------------------------------------
# The simulated LLM and the agent (identical in both runs)
# ---------------------------------------------------------------------------------------------------

class SimulatedLLM:
    """Stands in for a model API: sleeps `latency_s` per call and counts what actually ran."""

    def __init__(self, latency_s: float = CALL_LATENCY_S, seed: int = 4521) -> None:
        self.latency_s = latency_s
        self.calls = 0
        self.rng = random.Random(seed)
        self.last_reservation: str | None = None
        self.last_remaining: int | None = None
        self._lock = threading.Lock()

    def complete(self, task: str) -> None:
        # Inside a guarded call the Cycles context says what the server granted and what is left.
        ctx = get_cycles_context()
        if ctx is not None:
            self.last_reservation = ctx.reservation_id
            if ctx.balances:
                self.last_remaining = min(b.remaining.amount for b in ctx.balances)
        time.sleep(self.latency_s)
        with self._lock:
            self.calls += 1


llm = SimulatedLLM()


def draft_response(ticket: Ticket) -> str:
    llm.complete("draft_response")
    return f"Hi {ticket.customer.split()[0]}, sorry about the double charge. We are refunding it today."


def evaluate_quality(draft: str) -> float:
    llm.complete("evaluate_quality")
    return round(llm.rng.uniform(5.5, 6.9), 1)  # THE BUG: the score can never reach QUALITY_TARGET


def refine_response(draft: str, score: float) -> str:
    llm.complete("refine_response")
    return draft


def support_agent(ticket: Ticket, draft: Callable[[Ticket], str], evaluate: Callable[[str], float],
                  refine: Callable[[str, float], str], observe: Callable[[str, float | None], None],
                  keep_going: Callable[[], bool]) -> str:
    """Draft, then evaluate -> refine until the reply is good enough (it never is)."""
    reply = draft(ticket)
    observe("draft_response", None)
    while keep_going():
        score = evaluate(reply)
        observe("evaluate_quality", score)
        if score >= QUALITY_TARGET:
            return reply
        reply = refine(reply, score)
        observe("refine_response", score)
    return reply


# The guarded agent: the same three functions, each under @cycles. The decorator reserves $0.01
# before the call runs, commits it after, and raises BudgetExceededError instead of running the call
# when the server refuses the reservation.

@cycles(estimate=COST_PER_CALL_MICROCENTS, action_kind="llm.completion", action_name="draft-response")
def guarded_draft_response(ticket: Ticket) -> str:
    return draft_response(ticket)


@cycles(estimate=COST_PER_CALL_MICROCENTS, action_kind="llm.completion", action_name="evaluate-quality")
def guarded_evaluate_quality(draft: str) -> float:
    return evaluate_quality(draft)


@cycles(estimate=COST_PER_CALL_MICROCENTS, action_kind="llm.completion", action_name="refine-response")
def guarded_refine_response(draft: str, score: float) -> str:
    return refine_response(draft, score)


# ---------------------------------------------------------------------------------------------------
# One run and its live view
# ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    mode: str                          # "unguarded" | "guarded"
    speed: float
    time_limit_s: float | None = None  # simulated seconds (unguarded only)
    calls: int = 0
    executions_before: int = 0
    spend: int = 0
    started: float = 0.0
    ended: float | None = None
    last_action: str = "starting"
    last_score: float | None = None
    marks: dict[int, tuple[int, float]] = field(default_factory=dict)
    outcome: str = "running"           # time-limit | budget-exceeded | error | quality-passed | safety-cap
    denial: dict[str, Any] | None = None
    error: str | None = None
    balances: dict[str, dict[str, int]] | None = None
    scopes: list[str] = field(default_factory=list)

    def real_elapsed(self) -> float:
        return ((self.ended or time.monotonic()) - self.started) if self.started else 0.0

    def sim_elapsed(self) -> float:
        return self.real_elapsed() * self.speed

    def observe(self, action: str, score: float | None) -> None:
        self.calls += 1
        self.spend += COST_PER_CALL_MICROCENTS
        self.last_action, self.last_score = action, score
        for mark in MARKS:
            if mark not in self.marks and self.spend >= mark:
                self.marks[mark] = (self.calls, self.sim_elapsed())

    def rate_per_s(self) -> float:
        """Dollars per simulated second."""
        t = self.sim_elapsed()
        return (self.spend / DOLLAR) / t if t > 0 else 0.0

    def result(self) -> dict[str, Any]:
        return {"mode": self.mode, "calls": self.calls, "executions": llm.calls - self.executions_before,
                "spend_microcents": self.spend, "outcome": self.outcome, "denial": self.denial, "error": self.error,
                "elapsed_s": round(self.real_elapsed(), 3), "simulated_elapsed_s": round(self.sim_elapsed(), 3),
                "balances": self.balances}


def _elapsed_text(run: Run) -> str:
    text = f"{run.sim_elapsed():.1f} s"
    if run.speed != 1:
        text += f"  (simulated; {run.real_elapsed():.1f} s at ×{run.speed:g})"
    return text


def _last_text(run: Run) -> str:
    if run.last_score is None:
        return run.last_action
    return f"{run.last_action} · score {run.last_score:.1f} < {QUALITY_TARGET:.1f}"


def live_view(run: Run, remaining: int | None = None) -> Group:
    guarded = run.mode == "guarded"
    title = "GUARDED · @cycles, $1.00 budget at every scope" if guarded else "UNGUARDED · no budget authority"
    rows: list[tuple[str, object]] = [
        ("Ticket", f"{TICKET.id} · {TICKET.subject}"),
        ("Calls", f"{run.calls:,}"),
        ("Spend", Text(money(run.spend), style="bold green" if guarded else "bold red")),
        ("Elapsed", _elapsed_text(run)),
        ("Last call", _last_text(run)),
    ]
    if guarded:
        rows.append(("Remaining", "—" if remaining is None else f"{money(remaining)} (server, tightest scope)"))
    counter = Panel(kv(rows), title=title, title_align="left", border_style="green" if guarded else "red")

    marks = Table.grid(padding=(0, 1))
    for mark in MARKS:
        if guarded and mark > BUDGET_MICROCENTS:
            continue
        hit = run.marks.get(mark)
        if hit:
            marks.add_row(Text("✓", style="yellow"), money(mark), f"call {hit[0]} · {hit[1]:.1f} s")
        else:
            marks.add_row("·", money(mark), "")
    if guarded:
        marks.add_row(Text("■", style="green"), money(BUDGET_MICROCENTS), "hard stop (Cycles)")
    else:
        marks.add_row(Text("∞", style="red"), "$∞", "no hard stop")
    rate = run.rate_per_s()
    projection = kv([("per minute", money(int(rate * 60 * DOLLAR))), ("per hour", money(int(rate * 3600 * DOLLAR))),
                     ("per day", money(int(rate * 86400 * DOLLAR)))], key_style="")
    footer = (Text(f"Cycles caps it at {money(BUDGET_MICROCENTS)}", style="green") if guarded else
              Text(f"real LLM agent: ~{money(int(REAL_LLM_DOLLARS_PER_S * 3600 * DOLLAR))}/hour", style="dim"))
    projection_panel = Panel(Group(projection, footer), title="Projection at this rate", title_align="left")
    return Group(counter, Columns([Panel(marks, title="Budget marks", title_align="left"), projection_panel]))


def final_panel(run: Run) -> Panel:
    if run.mode == "unguarded":
        hit = run.marks.get(BUDGET_MICROCENTS)
        body = [Text("NO HARD STOP.", style="bold red"),
                Text(f"{run.calls:,} calls, {money(run.spend)} spent in {run.sim_elapsed():.1f} s; only the demo's "
                     f"{run.time_limit_s:g} s time limit ended it."),
                Text(f"$1.00 was passed at call {hit[0]} after {hit[1]:.1f} s, and the loop kept going." if hit else
                     "It had not reached $1.00 yet, and nothing would have stopped it there."),
                Text("A spend alert fires after the money is gone.")]
        return Panel(Group(*body), title="Unguarded result", title_align="left", border_style="red")
    if run.outcome == "budget-exceeded" and run.denial:
        d = run.denial
        body = [Text(f"Cycles stopped the agent BEFORE call {run.calls + 1} could run.", style="bold green"),
                Text("The server refused POST /v1/reservations:"),
                kv([("  HTTP status", d["status"]), ("  error code", d["error_code"]),
                    ("  request id", d["request_id"] or "—"), ("  message", d["message"])]),
                Text(f"Calls executed: {run.calls} · spend: {money(run.spend)} · the refused call's body never ran.")]
        if run.balances is not None:
            body += [Text(""), balance_table("Server balances after the run", run.scopes, run.balances)]
        return Panel(Group(*body), title="Guarded result", title_align="left", border_style="green")
    body = [Text(f"The guarded run ended unexpectedly ({run.outcome}).", style="bold red"),
            Text(run.error or ""), Text(f"Calls executed: {run.calls} · spend: {money(run.spend)}")]
    if run.balances is not None:
        body += [Text(""), balance_table("Server balances after the run", run.scopes, run.balances)]
    return Panel(Group(*body), title="Guarded result", title_align="left", border_style="red")


def comparison(unguarded: Run, guarded: Run) -> Panel:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("")
    table.add_column("Unguarded", style="red")
    table.add_column("Guarded by Cycles", style="green")
    stop = (f"{guarded.denial['status']} {guarded.denial['error_code']}" if guarded.denial else guarded.outcome)
    table.add_row("Calls", f"{unguarded.calls:,}", f"{guarded.calls:,} (call {guarded.calls + 1} refused)"
                  if guarded.denial else f"{guarded.calls:,}")
    table.add_row("Spend", money(unguarded.spend), money(guarded.spend))
    table.add_row("Stopped by", f"time limit ({unguarded.time_limit_s:g} s)", stop)
    table.add_row("At this rate, per day", money(int(unguarded.rate_per_s() * 86400 * DOLLAR)),
                  f"{money(BUDGET_MICROCENTS)}, then stop")
    return Panel(table, title="Same agent. Same bug. Two outcomes.", title_align="left")


def run_unguarded(console: Console, speed: float, time_limit_s: float) -> Run:
    llm.latency_s = CALL_LATENCY_S / speed
    run = Run("unguarded", speed, time_limit_s=time_limit_s, executions_before=llm.calls)
    deadline_real = time_limit_s / speed
    console.rule("[bold red]Unguarded run")
    run.started = time.monotonic()
    with live(console, lambda: live_view(run)):
        support_agent(TICKET, draft_response, evaluate_quality, refine_response, run.observe,
                      keep_going=lambda: time.monotonic() - run.started < deadline_real)
        run.ended = time.monotonic()
        run.outcome = "time-limit"
    console.print(final_panel(run))
    return run


def run_guarded(console: Console, backend: DemoBackend, speed: float) -> Run:
    llm.latency_s = CALL_LATENCY_S / speed
    llm.last_remaining = None
    run = Run("guarded", speed, executions_before=llm.calls, scopes=backend.hierarchy())
    console.rule("[bold green]Guarded run")
    backend.create_budgets([(scope, BUDGET_MICROCENTS) for scope in run.scopes])
    console.print(f"Server: {backend.describe()}")
    console.print(f"Budgets: $1.00 at each scope from {backend.budget_range()}")
    for note in backend.notes:
        console.print(f"[yellow]Note:[/] {note}")
    backend.notes.clear()

    # What a user writes: one client for the agent, made the default for every @cycles function.
    client = CyclesClient(CyclesConfig(base_url=backend.base_url, api_key=backend.api_key, tenant=backend.tenant,
                                       journal_dir=backend.journal_dir, **backend.levels))
    set_default_client(client)
    try:
        run.started = time.monotonic()
        with live(console, lambda: live_view(run, llm.last_remaining)):
            try:
                support_agent(TICKET, guarded_draft_response, guarded_evaluate_quality, guarded_refine_response,
                              run.observe, keep_going=lambda: run.calls < SAFETY_CAP_CALLS)
                run.outcome = "safety-cap" if run.calls >= SAFETY_CAP_CALLS else "quality-passed"
            except BudgetExceededError as exc:
                run.outcome = "budget-exceeded"
                run.denial = {"status": exc.status, "error_code": exc.error_code, "request_id": exc.request_id,
                              "message": exc.message}
            except CyclesError as exc:
                run.outcome = "error"
                run.error = f"{type(exc).__name__}: {exc}"
            run.ended = time.monotonic()
    finally:
        client.close()
    run.balances = backend.balances()
    console.print(final_panel(run))
    return run
