"""The `cycles` command."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from typing import Optional

import typer

from . import help_format, startup
from .store import default_data_dir, default_store_url, open_store

help_format.install()
app = typer.Typer(help="Cycles: the runtime budget and action authority for AI agents.\n\n"
                       "Exit codes: 1 the server refused, 2 bad usage, 3 missing configuration, 4 data "
                       "directory unusable, 5 store or server unreachable, 6 cannot listen on the address.",
                  no_args_is_help=True, add_completion=False)


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"cycles {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", envvar="CYCLES_DEBUG",
                               help="Show the full traceback when a command fails."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Options of every command."""
    if debug:
        os.environ["CYCLES_DEBUG"] = "1"


async def bootstrap_admin_key(store_url: str) -> str | None:
    """Create the store's schema and, without CYCLES_ADMIN_API_KEY, the stored admin key. Returns a new key."""
    from .server.auth import ADMIN_HASH_SETTING, hash_secret, new_admin_key

    store = open_store(store_url)
    try:
        if os.environ.get("CYCLES_ADMIN_API_KEY"):
            return None
        if await store.get_setting(ADMIN_HASH_SETTING) is not None:
            return None
        key = new_admin_key()
        stored = hash_secret(key)
        won = await store.put_setting(ADMIN_HASH_SETTING, stored, only_if_absent=True)
        return key if won == stored else None
    finally:
        await store.close()


def _store_with_secret_key(store: str | None, data_dir: str | None) -> str:
    """The store URL to use, after checking it and making sure webhook secrets can be sealed."""
    store_url = store or default_store_url(data_dir or default_data_dir())
    startup.check_store_url(store_url)
    startup.ensure_data_dir(store_url)
    startup.ensure_webhook_key(store_url)
    os.environ["CYCLES_STORE_URL"] = store_url  # also names the store in a failure's one-line message
    return store_url


from .demos.cli import app as demo_app  # noqa: E402

app.add_typer(demo_app, name="demo")

from .mcp.cli import app as mcp_app  # noqa: E402

app.add_typer(mcp_app, name="mcp")

from .conformance.cli import app as conformance_app  # noqa: E402

app.add_typer(conformance_app, name="conformance")

from .admin_cli.commands import app as admin_app, apply_command  # noqa: E402

app.add_typer(admin_app, name="admin")
app.command(name="apply")(apply_command)

from .evidence_cli import app as evidence_app  # noqa: E402

app.add_typer(evidence_app, name="evidence")

from .admin_cli.runtime import register as register_runtime  # noqa: E402

register_runtime(app)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(7878, help="Port to bind."),
    store: Optional[str] = typer.Option(None, "--store", help="Store URL, e.g. sqlite:///var/lib/cycles/cycles.db."),
    data_dir: Optional[str] = typer.Option(
        None, "--data-dir", help="Directory of the embedded store when --store is not given "
        "(default $CYCLES_DATA_DIR, else $XDG_DATA_HOME/cycles, else ~/.local/share/cycles)."),
    workers: int = typer.Option(1, min=1, max=64, help="Server processes sharing the store."),
    sweep_interval_ms: int = typer.Option(1000, min=0, help="How often expired leases are swept (0 disables)."),
    error_trace_id: Optional[bool] = typer.Option(
        None, "--error-trace-id/--no-error-trace-id", show_default="by client",
        help="Put trace_id in error bodies: always, or never (the trace id response header always has it). "
        "Default: in every body except for the published runcycles SDK (an httpx User-Agent and no trace "
        "headers), whose strict error model rejects it. Env CYCLES_ERROR_TRACE_ID=1, 0 or auto."),
    max_connections: int = typer.Option(
        1000, envvar="CYCLES_MAX_CONNECTIONS", help="Open connections per worker; at the cap an idle connection "
        "is closed for a new one, else the new one gets 503. Lowered to fit the file descriptor limit."),
    timeout_keep_alive: float = typer.Option(
        20.0, envvar="CYCLES_TIMEOUT_KEEP_ALIVE", help="Seconds a connection may stay idle (before its first "
        "request and between requests). Keep it above your clients' pool idle expiry (httpx: 5 s)."),
    timeout_header: float = typer.Option(
        10.0, envvar="CYCLES_TIMEOUT_HEADER", help="Seconds from a request's first byte to the end of its headers "
        "(408 and close after)."),
    timeout_body: float = typer.Option(
        30.0, envvar="CYCLES_TIMEOUT_BODY", help="Seconds from the end of a request's headers to the end of its "
        "body (close after)."),
    max_header_bytes: int = typer.Option(
        32 * 1024, envvar="CYCLES_MAX_HEADER_BYTES", help="Bytes of request line and headers (431 and close above)."),
    max_headers: int = typer.Option(100, envvar="CYCLES_MAX_HEADERS", help="Request headers (431 and close above)."),
    evidence: bool = typer.Option(
        False, "--evidence/--no-evidence", envvar="CYCLES_EVIDENCE", help="Sign a CyclesEvidence envelope for "
        "every decide, reserve, commit, release and denial, and put its cycles_evidence reference on the response "
        "(docs/evidence.md). Off by default: it costs CPU per request, and strict clients (runcycles 0.5.3 error "
        "bodies, MCP server 0.6.1) refuse the reference."),
    evidence_server_id: Optional[str] = typer.Option(
        None, envvar="CYCLES_EVIDENCE_SERVER_ID", show_default="http://HOST:PORT/v1",
        help="The public base URL (with /v1) envelopes name as server_id; the evidence URLs start with it."),
    access_log: bool = typer.Option(False, help="Log every request."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    dashboard: bool = typer.Option(True, "--dashboard/--no-dashboard", envvar="CYCLES_DASHBOARD",
                                   help="Serve the operator dashboard at /dashboard."),
    aggregate_interval_ms: int = typer.Option(
        1000, min=0, envvar="CYCLES_AGGREGATE_INTERVAL_MS", help="Redis Cluster: how often the server that "
        "holds the drain lease moves the tenants' outboxes into the cross-tenant views (0 disables)."),
    outbox_lag_bound_s: float = typer.Option(
        30.0, min=0, envvar="CYCLES_OUTBOX_LAG_BOUND_S", help="Redis Cluster: the views' lag (seconds) past "
        "which /actuator/health reports over_bound."),
) -> None:
    """Run the Cycles server."""
    import uvicorn

    from .server.connections import Limits, uvicorn_options
    from .server.errors_compat import parse_setting

    if error_trace_id is None:
        try:
            error_trace_id = parse_setting(os.environ.get("CYCLES_ERROR_TRACE_ID"))
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    limits = Limits(max_connections=max_connections, timeout_keep_alive=timeout_keep_alive,
                    timeout_header=timeout_header, timeout_body=timeout_body, max_header_bytes=max_header_bytes,
                    max_headers=max_headers)
    try:
        limits.check()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    from .server.keystrength import warning_text, weak_reasons

    from .core import actions as action_rules

    try:  # the operator's action-governance settings: a mistake stops the start, not every reservation
        action_rules.check_env()
    except action_rules.ActionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(startup.EXIT_CONFIG) from None
    store_url = _store_with_secret_key(store, data_dir)
    from .evidence_cli import ensure_keys

    ensure_keys(store_url, evidence)
    weak = weak_reasons(os.environ.get("CYCLES_ADMIN_API_KEY"))
    if weak:
        typer.echo(warning_text(weak), err=True)
    startup.check_port(host, port)  # before a key is generated and shown for a server that never starts
    startup.probe_store(store_url)
    new_key = asyncio.run(bootstrap_admin_key(store_url))
    if new_key:
        typer.echo("Generated the operator key (X-Admin-API-Key). It is stored hashed and shown only this once:")
        typer.echo(f"  {new_key}")
        typer.echo("  Lost it? Start the server with CYCLES_ADMIN_API_KEY=<a secret you choose>: while set, "
                   "it is the operator key.")
    typer.echo(f"Cycles serving on http://{host}:{port} with store {store_url} ({workers} worker(s))")
    os.environ["CYCLES_STORE_URL"] = store_url
    os.environ["CYCLES_SWEEP_INTERVAL_MS"] = str(sweep_interval_ms)
    os.environ["CYCLES_DASHBOARD"] = "1" if dashboard else "0"
    os.environ["CYCLES_AGGREGATE_INTERVAL_MS"] = str(aggregate_interval_ms)
    os.environ["CYCLES_OUTBOX_LAG_BOUND_S"] = repr(outbox_lag_bound_s)
    os.environ["CYCLES_ERROR_TRACE_ID"] = {True: "1", False: "0", None: "auto"}[error_trace_id]
    os.environ["CYCLES_EVIDENCE"] = "1" if evidence else "0"
    os.environ["CYCLES_EVIDENCE_SERVER_ID"] = evidence_server_id or (
        f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1")
    common = dict(host=host, port=port, access_log=access_log, log_level=log_level, lifespan="on",
                  loop="auto", timeout_graceful_shutdown=5)
    if workers == 1:
        from .server.app import create_app_from_env

        uvicorn.run(create_app_from_env(), **common, **uvicorn_options(limits))
        return
    metrics_dir = tempfile.mkdtemp(prefix="cycles-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        raise typer.Exit(_run_workers(workers, common, limits))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _listener(host: str, port: int, *, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    return sock


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive `cycles serve`: orphans would keep serving on the port (SO_REUSEPORT) beside
    the next server started there. Linux signals the worker when its parent dies (PR_SET_PDEATHSIG);
    elsewhere a thread watches the parent id."""
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, signal.SIGTERM, 0, 0, 0) == 0:  # 1 = PR_SET_PDEATHSIG
                if os.getppid() != parent:  # the parent died before prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="cycles-parent-watch", daemon=True).start()


def _worker_main(common: dict, limits: object, parent: int) -> None:
    """One server process with its own SO_REUSEPORT listener."""
    _die_with_parent(parent)
    import uvicorn

    from .server.app import create_app_from_env
    from .server.connections import uvicorn_options

    options = {k: v for k, v in common.items() if k not in ("host", "port")}
    sock = _listener(common["host"], common["port"], listen=True)
    uvicorn.Server(uvicorn.Config(create_app_from_env(), **options, **uvicorn_options(limits))).run(sockets=[sock])


def _run_workers(workers: int, common: dict, limits: object) -> int:
    """Run N worker processes, each listening on its own SO_REUSEPORT socket.

    With one shared listening socket (uvicorn's --workers), a burst of keep-alive connections lands
    mostly on one process; separate SO_REUSEPORT listeners let the kernel spread them evenly. A worker
    that dies is restarted; SIGTERM or SIGINT stops them all.
    """
    import multiprocessing
    import signal
    import time

    try:  # holds the port (bound, not listening, so it takes no connections) and fails early if taken
        guard = _listener(common["host"], common["port"], listen=False)
    except OSError as exc:
        typer.echo(f"cannot listen on {common['host']}:{common['port']}: {exc}", err=True)
        return 1
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs = [ctx.Process(target=_worker_main, args=(common, limits, os.getpid()), daemon=False) for _ in range(workers)]
    for proc in procs:
        proc.start()
    restarts: list[float] = []
    code = 0
    try:
        while not stopping:
            time.sleep(0.25)
            for i, proc in enumerate(procs):
                if proc.is_alive() or stopping:
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 5:
                    typer.echo("workers keep exiting; stopping", err=True)
                    stopping, code = True, 1
                    break
                typer.echo(f"worker {proc.pid} exited with {proc.exitcode}; restarting", err=True)
                procs[i] = ctx.Process(target=_worker_main, args=(common, limits, os.getpid()), daemon=False)
                procs[i].start()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
        guard.close()
    return code


# -- webhook delivery: `cycles worker` (cycles.webhooks.deliver) --
@app.command()
def worker(
    store: Optional[str] = typer.Option(None, "--store", help="Store URL (the one the servers use)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Directory of the embedded store when --store "
                                           "is not given (as for `cycles serve`)."),
    concurrency: int = typer.Option(64, min=1, max=10_000, help="Delivery attempts running at once."),
    per_endpoint: int = typer.Option(4, min=1, max=1000, help="Attempts running at once per endpoint "
                                     "(scheme, host, port of a subscription URL)."),
    lease_ms: int = typer.Option(60_000, min=1000, help="How long a claimed delivery is held; a worker that "
                                 "dies leaves it to another after this."),
    timeout_ms: int = typer.Option(30_000, min=100, help="Request timeout; must be shorter than --lease-ms."),
    poll_ms: int = typer.Option(200, min=10, help="How often the queue and the event log are read when idle."),
    dispatch: bool = typer.Option(True, help="Also turn new events into deliveries (off: deliver only)."),
    metrics_port: int = typer.Option(0, min=0, max=65535, help="Serve Prometheus metrics on this port (0: off)."),
    metrics_host: str = typer.Option("127.0.0.1", help="Address of the metrics listener."),
    log_level: str = typer.Option("info", help="Log level."),
) -> None:
    """Deliver webhooks: the dispatcher (event log -> deliveries) and the delivery worker, without serving
    the API. Run any number of them against one store; `cycles serve` embeds one unless
    CYCLES_EMBEDDED_WORKER=0."""
    import logging
    import signal

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store_url = _store_with_secret_key(store, data_dir)
    startup.probe_store(store_url)
    from .server.metrics import Metrics
    from .webhooks.crypto import SecretBox
    from .webhooks.deliver import Engine, EngineConfig, WorkerConfig

    config = EngineConfig(worker=WorkerConfig(concurrency=concurrency, per_endpoint=per_endpoint, lease_ms=lease_ms,
                                              timeout_ms=timeout_ms, poll_ms=poll_ms),
                          dispatch_ms=poll_ms, dispatch=dispatch)
    try:
        config.worker.check()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    metrics = Metrics()
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_host, registry=metrics.registry)

    async def run() -> None:
        st = open_store(store_url)
        engine = Engine(st, box=SecretBox.from_env(), metrics=metrics, config=config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        engine.start()
        typer.echo(f"Cycles webhook worker {engine.worker_id} on store {store_url}")
        try:
            await stop.wait()
        finally:
            await engine.stop()
            await st.close()

    asyncio.run(run())


@app.command()
def version() -> None:
    """Print the version."""
    from . import __version__

    typer.echo(__version__)


def main() -> None:
    """Every failure ends as one line and a distinct exit code (cycles.startup); --debug shows tracebacks."""
    import sys

    try:
        app()
    except Exception as exc:  # noqa: BLE001 - the last resort of a command-line program
        if startup.debug_enabled():
            raise
        verdict = startup.classify(exc, os.environ.get("CYCLES_STORE_URL"))
        if verdict is None:
            typer.echo(f"error: unexpected {type(exc).__name__}: {exc} (a bug: run with --debug for the "
                       "traceback and report it)", err=True)
            sys.exit(startup.EXIT_BUG)
        typer.echo(f"error: {verdict.message}", err=True)
        sys.exit(verdict.code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
