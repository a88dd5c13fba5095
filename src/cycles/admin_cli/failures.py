"""How a CLI command ends when something fails: one line on stderr and an exit code (cycles.startup)."""

from __future__ import annotations

import contextlib
from typing import Iterator, NoReturn

import httpx
import typer

from .. import startup
from . import render
from .client import ApiError, UsageError


def usage(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def failures(where: str, key: str | None, *, admin: bool) -> Iterator[None]:
    """Failures end the command as one line: exit 1 for the server's errors, 2 for unusable options,
    5 when the server or store cannot be reached, and the startup codes (cycles.startup) otherwise."""
    try:
        yield
    except ApiError as err:
        render.error(err.code, err.message + key_hint(err, key, admin=admin), err.request_id)
        # 503: the server is up but its store is not (health DOWN): unreachable, not a refusal
        raise typer.Exit(startup.EXIT_UNREACHABLE if err.status == 503 else startup.EXIT_REFUSED)
    except httpx.TransportError as err:
        render.error("CONNECTION_FAILED", f"cannot reach {where} ({err or type(err).__name__}); is "
                     "`cycles serve` running there? Check --url / CYCLES_BASE_URL")
        raise typer.Exit(startup.EXIT_UNREACHABLE)
    except httpx.HTTPError as err:
        render.error("CONNECTION_FAILED", f"{where}: {err}")
        raise typer.Exit(startup.EXIT_UNREACHABLE)
    except startup.StartupError as err:
        typer.echo(f"error: {err.message}", err=True)
        raise typer.Exit(err.code)
    except UsageError as err:
        usage(str(err))


def key_hint(err: ApiError, key: str | None, *, admin: bool) -> str:
    """Which kind of key a 401 wanted, when the one sent is visibly the other kind."""
    if err.status != 401 or not key:
        return ""
    if admin and key.startswith("cyc_live_"):
        return ("; this is a tenant API key (X-Cycles-API-Key): admin commands need the operator key "
                "(X-Admin-API-Key, CYCLES_ADMIN_API_KEY)")
    if not admin and key.startswith(("cyc_op_", "cyc_admin_")):
        return "; this is an operator key (X-Admin-API-Key): runtime commands need a tenant API key (CYCLES_API_KEY)"
    return ""


