"""`cycles demo action-authority`: a support agent may write notes and update the CRM, but not email.

Case #4782: Acme Corp was invoiced $847 against a $720 contract. The agent works it in four steps:
read the case (local, never gated), append an internal note, set the CRM status Open -> Investigating,
and send the customer an email. Each tool call costs $0.01 and takes ~200 ms.

Under Cycles each tool function carries `@cycles(..., toolset=...)`, so its reservation lands on a
toolset scope under the agent. The toolsets `internal-notes` and `crm-updates` have $1.00 each;
`send-email` has $0. The email's reservation is refused with 409 BUDGET_EXCEEDED, the SDK raises
BudgetExceededError before the send runs, and the agent escalates to a human: 3 approved · 1 blocked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..client import (BudgetExceededError, CyclesClient, CyclesConfig, CyclesError, cycles, get_cycles_context,
                      set_default_client)
from .backend import CENT, DOLLAR, DemoBackend, money
from .ui import balance_table, kv, live

COST_PER_TOOL_CALL_MICROCENTS = CENT   # $0.01 per tool call
TOOL_LATENCY_S = 0.200                 # ~200 ms per mock tool call
TOOLSET_BUDGETS = {"internal-notes": DOLLAR, "crm-updates": DOLLAR, "send-email": 0}
CASE_ID = "#4782"
ESCALATION = "Email blocked — not approved for autonomous execution. Escalated to human review."


# ---------------------------------------------------------------------------------------------------
# The mock systems the agent acts on
# ---------------------------------------------------------------------------------------------------

@dataclass
class Systems:
    """The helpdesk, the CRM and the mail server, in memory. `executed` lists the tool bodies that ran."""

    latency_s: float = TOOL_LATENCY_S
    case: dict[str, Any] = field(default_factory=lambda: {
        "id": "#4782", "customer": "Acme Corp", "contact": "billing@acme.example",
        "issue": "Invoice INV-2291 billed $847; the contract says $720",
    })
    notes: list[str] = field(default_factory=list)
    crm_status: str = "Open"
    outbox: list[dict[str, str]] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    grants: dict[str, str] = field(default_factory=dict)

    def work(self, tool: str) -> None:
        # Inside a guarded call, the Cycles context carries the server's decision for this action.
        ctx = get_cycles_context()
        if ctx is not None:
            self.grants[tool] = ctx.decision
        time.sleep(self.latency_s)
        self.executed.append(tool)


systems = Systems()


def read_case(case_id: str) -> dict[str, Any]:
    systems.work("read_case")
    return dict(systems.case)


def append_internal_note(case_id: str, text: str) -> str:
    systems.work("append_internal_note")
    systems.notes.append(text)
    return "note added"


def update_crm_status(case_id: str, status: str) -> str:
    systems.work("update_crm_status")
    old, systems.crm_status = systems.crm_status, status
    return f"{old} → {status}"


def send_customer_email(case_id: str, to: str, body: str) -> str:
    systems.work("send_customer_email")
    systems.outbox.append({"to": to, "body": body})
    return f"sent to {to}"


# The guarded tools: the same functions, each under @cycles with its own toolset.

@cycles(estimate=COST_PER_TOOL_CALL_MICROCENTS, action_kind="tool.notes", action_name="append-note",
        toolset="internal-notes")
def guarded_append_internal_note(case_id: str, text: str) -> str:
    return append_internal_note(case_id, text)


@cycles(estimate=COST_PER_TOOL_CALL_MICROCENTS, action_kind="tool.crm", action_name="update-status",
        toolset="crm-updates")
def guarded_update_crm_status(case_id: str, status: str) -> str:
    return update_crm_status(case_id, status)


@cycles(estimate=COST_PER_TOOL_CALL_MICROCENTS, action_kind="tool.email", action_name="send-reply",
        toolset="send-email")
def guarded_send_customer_email(case_id: str, to: str, body: str) -> str:
    return send_customer_email(case_id, to, body)


# ---------------------------------------------------------------------------------------------------
# The agent and its live view
# ---------------------------------------------------------------------------------------------------

@dataclass
class Step:
    tool: str
    label: str
    toolset: str | None
    call: Callable[[], str]
    status: str = "pending"   # pending | running | approved | blocked | error
    detail: str = ""


@dataclass
class Outcome:
    mode: str
    steps: list[Step]
    denial: dict[str, Any] | None = None
    error: str | None = None
    escalation: str | None = None
    balances: dict[str, dict[str, int]] | None = None
    scopes: list[str] = field(default_factory=list)
    executed_before: int = 0
    sent_before: int = 0

    @property
    def approved(self) -> int:
        return sum(s.status == "approved" for s in self.steps)

    @property
    def blocked(self) -> int:
        return sum(s.status == "blocked" for s in self.steps)

    def result(self) -> dict[str, Any]:
        return {"mode": self.mode, "approved": self.approved, "blocked": self.blocked,
                "steps": {s.tool: s.status for s in self.steps},
                "executed": systems.executed[self.executed_before:],
                "emails_sent": len(systems.outbox) - self.sent_before, "denial": self.denial, "error": self.error,
                "escalation": self.escalation, "balances": self.balances}


def plan(guarded: bool) -> list[Step]:
    case_id = CASE_ID
    note = "Invoice $847 vs contract $720: overbilled $127. Checking the rate card change."
    email = "Hello Acme billing team, we found a $127 overcharge on INV-2291 and will issue a corrected invoice."
    tools = ((guarded_append_internal_note, guarded_update_crm_status, guarded_send_customer_email) if guarded
             else (append_internal_note, update_crm_status, send_customer_email))
    return [
        Step("read_case", "Read case", None, lambda: "{customer}: $847 billed vs $720".format(**read_case(case_id))),
        Step("append_internal_note", "Internal note", "internal-notes", lambda: tools[0](case_id, note)),
        Step("update_crm_status", "CRM status", "crm-updates", lambda: tools[1](case_id, "Investigating")),
        Step("send_customer_email", "Customer email", "send-email",
             lambda: tools[2](case_id, systems.case["contact"], email)),
    ]


ICONS = {"pending": ("·", "dim"), "running": ("…", "yellow"), "approved": ("✓", "green"), "blocked": ("✗", "red"),
         "error": ("!", "red")}


def view(outcome: Outcome) -> Panel:
    guarded = outcome.mode == "guarded"
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    table.add_column("", no_wrap=True)
    table.add_column("Step", no_wrap=True)
    table.add_column("Toolset", no_wrap=True)
    table.add_column("Cycles decision · result")
    for i, step in enumerate(outcome.steps, 1):
        icon, style = ICONS[step.status]
        table.add_row(Text(icon, style=style), f"{i}. {step.label}", step.toolset or "(local)",
                      Text(step.detail, style=style if step.status in ("blocked", "error") else ""))
    title = ("GUARDED · @cycles with toolset budgets" if guarded else "UNGUARDED · every tool call just runs")
    return Panel(table, title=f"{title} · case {CASE_ID}", title_align="left",
                 border_style="green" if guarded else "red")


def summary(outcome: Outcome) -> Panel:
    guarded = outcome.mode == "guarded"
    sent = len(systems.outbox) - outcome.sent_before
    body: list[Any] = [Text(f"{outcome.approved} approved · {outcome.blocked} blocked", style="bold")]
    if outcome.denial:
        d = outcome.denial
        body += [Text(ESCALATION, style="bold green"),
                 Text("The server refused the email's POST /v1/reservations before the send ran:"),
                 kv([("  HTTP status", d["status"]), ("  error code", d["error_code"]),
                     ("  request id", d["request_id"] or "—"), ("  message", d["message"])])]
    elif outcome.error:
        body.append(Text(f"Unexpected error: {outcome.error}", style="bold red"))
    elif not guarded:
        body.append(Text("The customer email went out without anyone approving it.", style="red"))
    body.append(Text(f"Emails sent: {sent} · CRM status: {systems.crm_status} · internal notes: {len(systems.notes)}"))
    if outcome.balances is not None:
        body += [Text(""), balance_table("Server balances after the run", outcome.scopes, outcome.balances)]
    return Panel(Group(*body), title=f"{outcome.mode.capitalize()} result", title_align="left",
                 border_style="green" if guarded and outcome.denial and not outcome.error else "red")


def work_case(console: Console, outcome: Outcome) -> None:
    with live(console, lambda: view(outcome)):
        for step in outcome.steps:
            step.status = "running"
            try:
                result = step.call()
            except BudgetExceededError as exc:
                step.status = "blocked"
                step.detail = f"{exc.status} {exc.error_code} · not sent"
                outcome.denial = {"step": step.tool, "status": exc.status, "error_code": exc.error_code,
                                  "request_id": exc.request_id, "message": exc.message}
                outcome.escalation = ESCALATION
                continue
            except CyclesError as exc:
                step.status = "error"
                step.detail = f"{type(exc).__name__}: {exc}"
                outcome.error = step.detail
                continue
            step.status = "approved"
            grant = systems.grants.pop(step.tool, None) if outcome.mode == "guarded" else None
            step.detail = f"{grant} · {result}" if grant else result


def reset_systems(speed: float) -> None:
    systems.latency_s = TOOL_LATENCY_S / speed
    systems.notes.clear()
    systems.crm_status = "Open"
    systems.grants.clear()


def run_unguarded(console: Console, speed: float) -> Outcome:
    reset_systems(speed)
    console.rule("[bold red]Unguarded run")
    outcome = Outcome("unguarded", plan(guarded=False), executed_before=len(systems.executed),
                      sent_before=len(systems.outbox))
    work_case(console, outcome)
    console.print(summary(outcome))
    return outcome


def run_guarded(console: Console, backend: DemoBackend, speed: float) -> Outcome:
    reset_systems(speed)
    console.rule("[bold green]Guarded run")
    agent = backend.scope(upto="agent")
    toolsets = [f"{agent}/toolset:{name}" for name in TOOLSET_BUDGETS]
    backend.create_budgets([(scope, DOLLAR) for scope in backend.hierarchy()] +
                           [(scope, amount) for scope, amount in zip(toolsets, TOOLSET_BUDGETS.values())])
    console.print(f"Server: {backend.describe()}")
    console.print(f"Budgets: $1.00 at each scope from {backend.budget_range()}")
    console.print("Toolsets: " +
                  " · ".join(f"{name} {money(amount)}" for name, amount in TOOLSET_BUDGETS.items()))
    for note in backend.notes:
        console.print(f"[yellow]Note:[/] {note}")
    backend.notes.clear()

    client = CyclesClient(CyclesConfig(base_url=backend.base_url, api_key=backend.api_key, tenant=backend.tenant,
                                       journal_dir=backend.journal_dir, **backend.levels))
    set_default_client(client)
    outcome = Outcome("guarded", plan(guarded=True), scopes=backend.hierarchy() + toolsets,
                      executed_before=len(systems.executed), sent_before=len(systems.outbox))
    try:
        work_case(console, outcome)
    finally:
        client.close()
    outcome.balances = backend.balances()
    console.print(summary(outcome))
    return outcome
