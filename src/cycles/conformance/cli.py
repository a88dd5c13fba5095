"""`cycles conformance run|sdk|requirements`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Check a Cycles server (or our SDK) against the protocol's conformance requirements.",
                  no_args_is_help=True, add_completion=False)

STYLE = {"pass": "green", "fail": "bold red", "not_applicable": "dim", "could_not_test": "yellow",
         "not_run": "dim"}
LABEL = {"pass": "pass", "fail": "FAIL", "not_applicable": "n/a", "could_not_test": "could not test",
         "not_run": "not run"}


def _check_writable(path: Path | None, option: str) -> None:
    """Refuse an unwritable output path before the run, not after it."""
    if path is None:
        return
    parent = path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        typer.echo(f"error: {option} {path}: directory {parent} does not exist or is not writable", err=True)
        raise typer.Exit(2)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def render(report: dict[str, Any], console: Console, verbose: bool = False) -> None:
    table = Table(show_header=True, header_style="bold", expand=False, pad_edge=False, show_lines=False)
    table.add_column("result", no_wrap=True)
    table.add_column("requirement")
    table.add_column("detail", overflow="fold")
    section = None
    for row in report["requirements"]:
        if row["status"] == "not_run" and not verbose:
            continue
        if row["section"] != section:
            section = row["section"]
            table.add_row("", f"[bold]{section}[/]", "")
        detail = row["detail"]
        if len(detail) > 160 and not verbose:
            detail = detail[:157] + "…"
        item = row["id"][len(section) + 3:] if row["id"].startswith(section + " / ") else row["id"]
        table.add_row(f"[{STYLE[row['status']]}]{LABEL[row['status']]}[/]", item, detail)
    console.print(table)
    for row in report["requirements"]:
        if row["status"] == "fail" and row["evidence"] and (row["level"] == "MUST" or verbose):
            ev = row["evidence"][0]
            req, resp = ev["request"], ev["response"]
            console.print(f"[bold red]✗ {row['id']}[/]\n  {req['method']} {req['path']} → {resp['status']} "
                          f"{resp['body'][:300]}\n  expected: {ev['expected']}"
                          + (f"\n  schema: {'; '.join(ev['schema_errors'][:2])}" if ev.get("schema_errors") else ""))
    for line in report["skipped"]:
        console.print(f"[yellow]skipped[/] {line}")
    must, should = report["summary"]["must"], report["summary"]["should"]
    verdict = "[bold green]CONFORMANT[/] (every MUST passed)" if report["summary"]["conformant"] else \
        "[bold red]NOT CONFORMANT[/]" if must["fail"] else "[bold yellow]INCOMPLETE[/] (some MUSTs could not be tested)"
    console.print(f"MUST: {must['pass']} pass, {must['fail']} fail, {must['not_applicable']} n/a, "
                  f"{must['could_not_test']} could not test · SHOULD: {should['pass']} pass, {should['fail']} not met, "
                  f"{should['could_not_test']} could not test · {report['duration_ms'] / 1000:.1f} s → {verdict}")


@app.command("run")
def run_command(
    url: str = typer.Argument(..., help="Base URL of the server, e.g. http://127.0.0.1:7878"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CYCLES_API_KEY",
                                          help="A tenant API key (made for the run when --admin-key is given)."),
    admin_key: Optional[str] = typer.Option(None, "--admin-key", envvar="CYCLES_ADMIN_API_KEY",
                                            help="Admin key: the kit creates a tenant named for the run, isolated "
                                                 "budgets, and closes the tenant at the end."),
    tenant: Optional[str] = typer.Option(None, "--tenant", help="The tenant of --api-key (else discovered)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to this file."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these requirement groups "
                                             "(repeatable; see `cycles conformance requirements`)."),
    concurrency: int = typer.Option(16, "--concurrency", min=2, max=256, help="Concurrent clients in the race check."),
    timeout: float = typer.Option(15.0, "--timeout", min=0.5, help="Per-request timeout in seconds."),
    webhook_url: str = typer.Option("https://example.com/cycles/hook", "--webhook-url", show_default=False,
                                    help="Endpoint for the webhook subscriptions the kit creates (must pass the "
                                         "server's URL policy; nothing needs to listen there). Default: "
                                         "https://example.com/cycles/hook"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show every requirement and full details."),
) -> None:
    """Probe a running server over HTTP and report per requirement of CONFORMANCE.md.

    Exit 0 only when every MUST passed (or does not apply); 1 otherwise; 2 bad usage; 5 unreachable."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .kit import Unreachable, run

    if not api_key and not admin_key:
        typer.echo("error: give --api-key, --admin-key, or both", err=True)
        raise typer.Exit(2)
    _check_writable(json_out, "--json")
    console = Console(stderr=False)
    with Progress(TextColumn("[bold]conformance[/]"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("starting", total=1)

        def progress(name: str, i: int, n: int) -> None:
            bar.update(task, description=name, completed=i, total=n)

        try:
            report = run(url, api_key, admin_key, tenant, only=list(only or []) or None, concurrency=concurrency,
                         timeout=timeout, webhook_url=webhook_url, progress=progress)
        except ValueError as e:
            bar.stop()
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except Unreachable as e:
            bar.stop()
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(5) from None
    render(report, console, verbose)
    if json_out:
        _write_json(json_out, report)
        console.print(f"report written to {json_out}")
    raise typer.Exit(0 if report["summary"]["conformant"] else 1)


@app.command("requirements")
def requirements_command() -> None:
    """List the requirements the kit checks, with their group (for --only)."""
    from .requirements import CATALOG

    table = Table("group", "level", "requirement")
    for r in CATALOG:
        table.add_row(r.group, r.level, r.id)
    Console().print(table)


@app.command("sdk")
def sdk_command(
    report_json: Path = typer.Option(Path("recovery.json"), "--report-json",
                                     help="Where to write the report (validates against report.schema.json)."),
    server: Optional[str] = typer.Option(None, "--server", help="Run against this server (needs --admin-key); "
                                         "default: a private `cycles serve` on a temporary SQLite store."),
    admin_key: Optional[str] = typer.Option(None, "--admin-key", envvar="CYCLES_ADMIN_API_KEY"),
    implementation_commit: str = typer.Option("unknown", "--implementation-commit", help="The SDK's commit."),
    evidence_url: Optional[str] = typer.Option(None, "--evidence-url", help="CI run URL recorded in the report."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these scenario ids (repeatable)."),
) -> None:
    """Run client-recovery/scenarios.yaml against our Python SDK, with faults injected by a proxy.

    The claim is durable when every scenario passed, else core. Exit 0 when every scenario of the claimed
    level passed; 1 otherwise; 5 when no server could be started or reached."""
    from .sdk import claim_holds, run_sdk

    _check_writable(report_json, "--report-json")
    console = Console()
    try:
        report = run_sdk(server, admin_key, implementation_commit, evidence_url, only=list(only or []) or None,
                         progress=lambda sid: console.print(f"  running {sid}…", style="dim"))
    except RuntimeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(5) from None
    table = Table("scenario", "level", "name", "result", "diagnostic")
    for s in report["scenarios"]:
        table.add_row(s["id"], s["level"], s["name"], "[green]pass[/]" if s["passed"] else "[bold red]FAIL[/]",
                      s.get("diagnostic", ""))
    console.print(table)
    _write_json(report_json, report)
    console.print(f"claim: [bold]{report['claim']}[/] · {report['summary']['passed']}/{report['summary']['total']} "
                  f"passed · report written to {report_json}")
    raise typer.Exit(0 if claim_holds(report, complete=not only) else 1)
