"""Static texts of the MCP server: instructions, the docs resources and the prompts."""

from __future__ import annotations

INSTRUCTIONS = """\
Cycles is a budget authority. Before a costly or risky action (an LLM call, a paid API, sending an
email, a deployment), call cycles_reserve with an estimate and your own idempotencyKey. Proceed only
if the decision is ALLOW or ALLOW_WITH_CAPS (then respect the caps). Afterwards ALWAYS settle the
reservation: cycles_commit with the actual amount when the action ran, cycles_release when it did
not. Use cycles_decide for a cheap preflight check that holds nothing, cycles_check_balance to see
what is left, and cycles_create_event to record spend that had no reservation. Reuse the same
idempotencyKey when you retry the same step; use a new key for a new step. Lines starting with
HINT: are advice for you, not data."""

QUICKSTART = """\
# Cycles quickstart (MCP)

1. **Reserve** before the action:
   `cycles_reserve {idempotencyKey: "run42-step3", action: {kind: "llm.completion", name: "gpt-4o"},
   estimate: {unit: "USD_MICROCENTS", amount: 2000000}}` (the subject comes from CYCLES_TENANT … CYCLES_TOOLSET
   unless you pass one).
2. **Check the decision**: `ALLOW` → go; `ALLOW_WITH_CAPS` → go within `caps` (maxTokens,
   toolAllowlist/toolDenylist, cooldownMs); an error such as `BUDGET_EXCEEDED` → do not run the
   action.
3. **Settle**: `cycles_commit {reservationId, idempotencyKey: "run42-step3-commit", actual: {...}}`
   with what it really cost, or `cycles_release {reservationId, idempotencyKey: "run42-step3-release"}`
   if you did not run it. Unsettled reservations hold budget until their TTL expires (60 s by default;
   `cycles_extend` for long work).

Amounts are integers. `USD_MICROCENTS` are millionths of a cent: $1 = 100 000 000. Other units:
`TOKENS`, `CREDITS`, `RISK_POINTS`.

Idempotency keys are yours: retrying with the same key can never charge twice; a new key is a new
operation.
"""

PATTERNS = """\
# Cycles integration patterns

* **Reserve → execute → commit/release** around every costly call. Commit the actual, not the
  estimate, so the unused part of the hold returns to the budget.
* **Preflight with cycles_decide** when you are only choosing between options (cheap model or
  expensive one); it holds nothing.
* **Degrade instead of failing**: on a DENY or a low-budget HINT, switch to a cheaper model, skip
  optional steps, shorten outputs or stop and report.
* **Caps**: ALLOW_WITH_CAPS carries limits (maxTokens, tool allow/deny lists, cooldown). Respect them.
* **Long work**: extend the reservation (cycles_extend) before it expires; a commit after expiry
  is refused with RESERVATION_EXPIRED, then record the spend with cycles_create_event.
* **Spend without a reservation** (a webhook, a batch job): cycles_create_event.
* **Binding budgets**: an agent can skip cycles_reserve. To make a tool's budget binding, run its
  MCP server behind `cycles mcp gate -- <command>`: every tool call is reserved first and a denied
  call never reaches the tool.
* **Scopes**: tenant → workspace → app → workflow → agent → toolset. A reservation must fit every
  budget on its path; `toolset:<name>` budgets limit individual tools.
"""

PROMPTS = {
    "integrate_cycles": {
        "description": "Guide for adding Cycles budget enforcement to code.",
        "arguments": [("language", "Programming language (e.g. python, typescript)", False),
                      ("use_case", "What is being budgeted (LLM calls, tool calls, actions)", False)],
    },
    "diagnose_overrun": {
        "description": "Investigate why a budget was exceeded or a reservation was denied.",
        "arguments": [("reservation_id", "A reservation to start from", False),
                      ("scope", "A scope such as tenant:acme/workspace:prod", False)],
    },
    "design_budget_strategy": {
        "description": "Design budgets, scopes and units for a system.",
        "arguments": [("description", "What the system does and what it spends on", True),
                      ("tenant_model", "How tenants/customers map to the system", False)],
    },
}


def prompt_text(name: str, args: dict[str, str]) -> str:
    if name == "integrate_cycles":
        language = args.get("language") or "python"
        use_case = args.get("use_case") or "LLM calls"
        extra = ("In Python use the SDK: `from cycles.client import CyclesClient, cycles` and decorate the costly "
                 "function with `@cycles(estimate=..., actual=..., action_kind=..., action_name=...)`; it "
                 "reserves, commits, releases on errors and extends long calls for you."
                 if language.lower().startswith("py") else
                 "Call the HTTP API directly: POST /v1/reservations, then POST /v1/reservations/{id}/commit or "
                 "/release, with the X-Cycles-API-Key header and an X-Idempotency-Key equal to the body's key.")
        return (f"Help me add Cycles budget enforcement to a {language} codebase for {use_case}.\n\n"
                "Find every place that spends money or takes a risky action. For each one: reserve before it "
                "with an estimate, skip or degrade the work when the reservation is denied, commit the actual "
                "afterwards and release on failure. Use stable idempotency keys derived from the business "
                f"operation.\n\n{extra}\n\nRead cycles://docs/quickstart and cycles://docs/patterns first.")
    if name == "diagnose_overrun":
        parts = ["Investigate a Cycles budget problem."]
        if args.get("reservation_id"):
            parts.append(f"Start with reservation {args['reservation_id']}: read it with cycles_get_reservation "
                         "(status, reserved, committed, scope path, timestamps).")
        if args.get("scope"):
            parts.append(f"Look at the scope {args['scope']} with cycles_check_balance (includeChildren: true).")
        parts.append("List recent reservations with cycles_list_reservations (ACTIVE ones still hold budget; many "
                     "EXPIRED ones mean callers forget to commit or release). Compare estimates with actual "
                     "commits, find the scope whose remaining is lowest, and explain which budget caused the "
                     "denial and what to change: the estimate, the allocation, the overage policy, or the caller.")
        return "\n\n".join(parts)
    if name == "design_budget_strategy":
        tenant_model = args.get("tenant_model") or "not specified"
        return (f"Design a Cycles budget strategy for this system:\n\n{args.get('description', '')}\n\n"
                f"Tenant model: {tenant_model}.\n\n"
                "Propose: the scope hierarchy (tenant, workspace, app, workflow, agent, toolset) and what maps to "
                "each level; which scopes get budgets and how large; the unit for each (USD_MICROCENTS for "
                "money, TOKENS, CREDITS, RISK_POINTS for risky actions such as sending email); commit overage "
                "policies and overdraft limits; per-tool toolset budgets for actions that must be binding (and "
                "running those tools behind `cycles mcp gate`); and how agents should degrade when budget is low.")
    raise KeyError(name)
