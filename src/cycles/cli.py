"""The `cycles` command."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from typing import Optional

import typer

from .store import default_data_dir, default_store_url, open_store

app = typer.Typer(help="Cycles: the runtime budget and action authority for AI agents.", no_args_is_help=True,
                  add_completion=False)


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
    """The store URL to use, after making sure webhook secrets can be sealed (exit 2 if not)."""
    store_url = store or default_store_url(data_dir or default_data_dir())
    try:
        _webhook_secret_key(store_url)
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return store_url


def _webhook_secret_key(store_url: str) -> None:
    """Webhook signing secrets are sealed with a key the server must have before it starts. On the
    embedded store (one machine) a key file beside the database is made once and reused; servers
    sharing a Redis store must all be given the same key (CYCLES_WEBHOOK_SECRET_KEY)."""
    import base64
    import secrets as _secrets

    from .webhooks.crypto import KEY_ENV, PLAINTEXT_ENV, SecretBox

    if os.environ.get(KEY_ENV) or os.environ.get(PLAINTEXT_ENV):
        SecretBox.from_env()  # a malformed key fails here, before the server starts
        return
    if not store_url.startswith("sqlite:///"):
        raise RuntimeError(f"set {KEY_ENV} (the same 32-byte key, base64, on every server sharing this store), "
                           f"or {PLAINTEXT_ENV}=1 to keep webhook secrets in plaintext")
    path = os.path.join(os.path.dirname(os.path.abspath(store_url[len("sqlite:///"):])), "webhook-secret.key")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)  # the database lives here too
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(_secrets.token_bytes(32)).decode())
    with open(path) as f:
        os.environ[KEY_ENV] = f.read().strip()


from .demos.cli import app as demo_app  # noqa: E402

app.add_typer(demo_app, name="demo")

from .mcp.cli import app as mcp_app  # noqa: E402

app.add_typer(mcp_app, name="mcp")

from .admin_cli.commands import app as admin_app, apply_command  # noqa: E402

app.add_typer(admin_app, name="admin")
app.command(name="apply")(apply_command)


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
        help="trace_id in error bodies (the X-Cycles-Trace-Id header always has it). Default: in every body "
        "except for the published runcycles SDK (User-Agent python-httpx/*, no trace headers), whose strict "
        "ErrorResponse rejects it; --error-trace-id: always; --no-error-trace-id: never. "
        "Env CYCLES_ERROR_TRACE_ID=1|0|auto."),
    max_connections: int = typer.Option(
        1000, envvar="CYCLES_MAX_CONNECTIONS", help="Open connections per worker; at the cap an idle connection "
        "is closed for a new one, else the new one gets 503. Lowered to fit the file descriptor limit."),
    timeout_keep_alive: float = typer.Option(
        5.0, envvar="CYCLES_TIMEOUT_KEEP_ALIVE", help="Seconds a connection may stay idle (before its first "
        "request and between requests)."),
    timeout_header: float = typer.Option(
        10.0, envvar="CYCLES_TIMEOUT_HEADER", help="Seconds from a request's first byte to the end of its headers "
        "(408 and close after)."),
    timeout_body: float = typer.Option(
        30.0, envvar="CYCLES_TIMEOUT_BODY", help="Seconds from the end of a request's headers to the end of its "
        "body (close after)."),
    max_header_bytes: int = typer.Option(
        32 * 1024, envvar="CYCLES_MAX_HEADER_BYTES", help="Bytes of request line and headers (431 and close above)."),
    max_headers: int = typer.Option(100, envvar="CYCLES_MAX_HEADERS", help="Request headers (431 and close above)."),
    access_log: bool = typer.Option(False, help="Log every request."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
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

    store_url = _store_with_secret_key(store, data_dir)
    weak = weak_reasons(os.environ.get("CYCLES_ADMIN_API_KEY"))
    if weak:
        typer.echo(warning_text(weak), err=True)
    new_key = asyncio.run(bootstrap_admin_key(store_url))
    if new_key:
        typer.echo("Generated the operator key (X-Admin-API-Key). It is stored hashed and shown only this once:")
        typer.echo(f"  {new_key}")
    typer.echo(f"Cycles serving on http://{host}:{port} with store {store_url} ({workers} worker(s))")
    os.environ["CYCLES_STORE_URL"] = store_url
    os.environ["CYCLES_SWEEP_INTERVAL_MS"] = str(sweep_interval_ms)
    os.environ["CYCLES_ERROR_TRACE_ID"] = {True: "1", False: "0", None: "auto"}[error_trace_id]
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
    dispatch: bool = typer.Option(True, help="Also turn new events into deliveries (--no-dispatch: deliver only)."),
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
    app()


if __name__ == "__main__":
    main()
