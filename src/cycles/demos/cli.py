"""`cycles demo ...`: the Typer sub-app. Heavy imports happen inside the commands."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(help="Run a demo on its own in-process server (no Docker, no Redis; nothing is left behind). "
                       "With --server, on the real server named by CYCLES_BASE_URL instead, with "
                       "CYCLES_API_KEY or CYCLES_ADMIN_API_KEY.", no_args_is_help=True)


class Mode(str, Enum):
    unguarded = "unguarded"
    guarded = "guarded"
    both = "both"


MODE = typer.Option(Mode.both, "--mode", help="Which run(s) to show.", case_sensitive=False)
SPEED = typer.Option(1.0, "--speed", min=0.01, max=1000.0,
                     help="Run the simulation this many times faster (calls take 50 ms / SPEED; time limits shrink "
                          "the same way). Counts and costs do not change.")
JSON_OUT = typer.Option(None, "--json-out", help="Also write the results as JSON to this file.")
SERVER = typer.Option(False, "--server", help="Run on the real server named by CYCLES_BASE_URL (with CYCLES_API_KEY, "
                      "a tenant key with admin:write, whose budgets the run adds and leaves; or CYCLES_ADMIN_API_KEY, "
                      "with a fresh tenant closed afterwards) instead of an in-process one.")


def _write_json(path: Optional[Path], data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")


def _backend(console: Any, server: bool) -> Any:
    from .backend import DemoBackend, DemoSetupError

    env = dict(os.environ)
    if not server:
        # the SDK's variables may point at the user's real tenant: a demo spends there only when asked
        if env.pop("CYCLES_BASE_URL", None):
            console.print("[dim]Using an in-process server; CYCLES_BASE_URL is ignored without --server.[/]")
        for name in ("CYCLES_API_KEY", "CYCLES_ADMIN_API_KEY", "CYCLES_TENANT"):
            env.pop(name, None)
    elif not env.get("CYCLES_BASE_URL"):
        console.print("[bold red]Cannot set up the demo:[/] --server needs CYCLES_BASE_URL (the server's URL)")
        raise typer.Exit(2)
    backend = DemoBackend(env=env)
    try:
        backend.__enter__()
    except DemoSetupError as exc:
        console.print(f"[bold red]Cannot set up the demo:[/] {exc}")
        raise typer.Exit(exc.exit_code) from None
    return backend


@app.command("runaway")
def runaway(
    mode: Mode = MODE,
    speed: float = SPEED,
    unguarded_seconds: float = typer.Option(30.0, "--unguarded-seconds", min=0.01,
                                            help="Time limit of the unguarded run, in simulated seconds."),
    json_out: Optional[Path] = JSON_OUT,
    server: bool = SERVER,
) -> None:
    """A support agent stuck in an evaluate -> refine loop: unguarded it burns money until the time limit;
    under @cycles with $1.00 budgets it stops before call 101 on the server's 409 BUDGET_EXCEEDED."""
    from . import runaway as demo
    from .backend import DemoSetupError
    from .ui import make_console

    console = make_console()
    console.print(f"[bold]Cycles demo: the runaway agent[/] · $0.01 and ~{demo.CALL_LATENCY_S * 1000:.0f} ms per call")
    console.print(f"Ticket {demo.TICKET.id}: draft, then evaluate → refine until the score is "
                  f"{demo.QUALITY_TARGET:g}+ (it never is)")
    results: dict[str, Any] = {"demo": "runaway", "speed": speed}
    unguarded = guarded = None
    if mode in (Mode.unguarded, Mode.both):
        unguarded = demo.run_unguarded(console, speed, unguarded_seconds)
        results["unguarded"] = unguarded.result()
    ok = True
    if mode in (Mode.guarded, Mode.both):
        backend = _backend(console, server)
        try:
            results["server"] = {"mode": backend.mode, "tenant": backend.tenant, "scopes": backend.hierarchy()}
            guarded = demo.run_guarded(console, backend, speed)
            results["guarded"] = guarded.result()
            ok = guarded.outcome == "budget-exceeded"
        except DemoSetupError as exc:
            console.print(f"[bold red]Demo setup failed:[/] {exc}")
            raise typer.Exit(exc.exit_code) from None
        finally:
            backend.close()
            for note in backend.notes:
                console.print(f"[yellow]Note:[/] {note}")
    if unguarded is not None and guarded is not None:
        console.print(demo.comparison(unguarded, guarded))
    _write_json(json_out, results)
    if not ok:
        raise typer.Exit(1)


@app.command("action-authority")
def action_authority(mode: Mode = MODE, speed: float = SPEED, json_out: Optional[Path] = JSON_OUT,
                     server: bool = SERVER) -> None:
    """A support agent works a billing dispute: notes and CRM updates are approved, the customer email
    hits a $0 toolset budget and is blocked before it is sent (3 approved · 1 blocked)."""
    from . import action_authority as demo
    from .backend import DemoSetupError
    from .ui import make_console

    console = make_console()
    console.print(f"[bold]Cycles demo: action authority[/] · $0.01 and ~{demo.TOOL_LATENCY_S * 1000:.0f} ms per "
                  "tool call")
    console.print(f"Case {demo.CASE_ID}: Acme Corp billed $847 on a $720 contract. Read, note, CRM, email.")
    results: dict[str, Any] = {"demo": "action-authority", "speed": speed}
    ok = True
    if mode in (Mode.unguarded, Mode.both):
        results["unguarded"] = demo.run_unguarded(console, speed).result()
    if mode in (Mode.guarded, Mode.both):
        backend = _backend(console, server)
        try:
            results["server"] = {"mode": backend.mode, "tenant": backend.tenant}
            outcome = demo.run_guarded(console, backend, speed)
            results["guarded"] = outcome.result()
            ok = outcome.denial is not None and outcome.error is None
        except DemoSetupError as exc:
            console.print(f"[bold red]Demo setup failed:[/] {exc}")
            raise typer.Exit(exc.exit_code) from None
        finally:
            backend.close()
            for note in backend.notes:
                console.print(f"[yellow]Note:[/] {note}")
    _write_json(json_out, results)
    if not ok:
        raise typer.Exit(1)
