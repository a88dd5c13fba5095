"""`cycles mcp` (the MCP server) and `cycles mcp gate -- COMMAND ARGS...` (the budget gate)."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from .config import ConfigError

app = typer.Typer(help="Cycles for MCP clients (Claude Desktop, Claude Code, Cursor, Windsurf).",
                  invoke_without_command=True, add_completion=False)


def _fail(err: Exception) -> None:
    typer.echo(f"cycles mcp: {err}", err=True)
    raise typer.Exit(2)


@app.callback()
def mcp(
    ctx: typer.Context,
    transport: str = typer.Option("stdio", help="stdio, or http for Streamable HTTP on /mcp."),
    host: str = typer.Option("127.0.0.1", help="HTTP transport: address to bind."),
    port: int = typer.Option(3000, help="HTTP transport: port to bind."),
    auth_token: Optional[str] = typer.Option(
        None, "--auth-token", envvar="MCP_HTTP_AUTH_TOKEN", show_envvar=True,
        help="HTTP transport: bearer token required on /mcp (required unless bound to loopback)."),
    log_level: str = typer.Option("warning", help="HTTP transport: uvicorn log level."),
) -> None:
    """Run the Cycles MCP server (stdio by default). Configured by CYCLES_BASE_URL, CYCLES_API_KEY,
    CYCLES_TENANT ... CYCLES_TOOLSET, CYCLES_MOCK."""
    if ctx.invoked_subcommand is not None:
        return
    from .config import Settings, check_http_token

    if transport not in ("stdio", "http"):
        _fail(ValueError(f"--transport must be stdio or http, not {transport!r}"))
    try:
        settings = Settings.from_env()  # configuration problems stop here, before the MCP SDK is imported
        if transport == "http":
            check_http_token(host, auth_token)
        import anyio

        from .run import serve_http, serve_stdio

        if transport == "stdio":
            anyio.run(serve_stdio, settings)
        else:
            serve_http(settings, host, port, auth_token, log_level)
    except ConfigError as err:
        _fail(err)
    except KeyboardInterrupt:
        pass


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def gate(
    command: List[str] = typer.Argument(..., help="The upstream MCP server command, after --."),
    config: Optional[str] = typer.Option(None, "--config", envvar="CYCLES_GATE_CONFIG", show_envvar=True,
                                         help="TOML (or .json) file with per-tool estimates and units."),
) -> None:
    """Run an MCP server that forwards the tools of COMMAND and reserves budget before every tool call
    (toolset = the tool's name). A denied call never reaches the upstream."""
    from .config import Settings

    if not command:
        _fail(ValueError("give the upstream server command after --, e.g. cycles mcp gate -- npx some-server"))
    try:
        settings = Settings.from_env()
        if not settings.mock and "tenant" not in settings.defaults:
            raise ConfigError("cycles mcp gate needs CYCLES_TENANT (the tenant whose budgets gate the tools)")
        from .gate import GateConfig, run_gate

        gate_config = GateConfig.load(config)
        import anyio

        if settings.mock:
            from .config import MOCK_BANNER

            print(MOCK_BANNER, file=sys.stderr, flush=True)
        anyio.run(run_gate, list(command), settings, gate_config)
    except ConfigError as err:
        _fail(err)
    except KeyboardInterrupt:
        pass
    except OSError as err:
        _fail(OSError(f"cannot start the upstream {command[0]!r}: {err}"))

