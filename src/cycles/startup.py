"""Startup and connection failures as one line each (what failed, what to do) with a distinct exit code.

Every `cycles` command ends through `main()` in cycles.cli, which turns the exceptions classified here
into `error: ...` on stderr and the code below; `cycles --debug` (or CYCLES_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import sqlite3
from urllib.parse import urlparse

# Exit codes, the same for every command (documented in README "Exit codes").
EXIT_REFUSED = 1       # the server answered with an error
EXIT_USAGE = 2         # bad option or argument, including a store URL that cannot work
EXIT_CONFIG = 3        # a required setting is missing or malformed (e.g. the webhook secret key)
EXIT_DATA_DIR = 4      # the data directory or database file cannot be created, written or read
EXIT_UNREACHABLE = 5   # the store (Redis) or the Cycles server cannot be reached
EXIT_PORT = 6          # the address to listen on is taken or not allowed
EXIT_BUG = 70          # anything else: an unexpected error (EX_SOFTWARE)

KEY_ENV = "CYCLES_WEBHOOK_SECRET_KEY"
PLAINTEXT_ENV = "CYCLES_WEBHOOK_ALLOW_PLAINTEXT"
MAKE_KEY = ("export CYCLES_WEBHOOK_SECRET_KEY=$(python3 -c "
            "'import base64,os; print(base64.b64encode(os.urandom(32)).decode())')")
STORE_FORMS = ("sqlite:///absolute/path.db, sqlite:relative/path.db, redis://host:6379/0 or "
               "redis-cluster://host:7000[,host:7001...]/")


class StartupError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def debug_enabled() -> bool:
    return os.environ.get("CYCLES_DEBUG", "").strip().lower() in ("1", "true", "yes")


def sqlite_path(store_url: str) -> str | None:
    """The database file of a sqlite: URL (relative to the working directory unless absolute)."""
    parsed = urlparse(store_url)
    if parsed.scheme != "sqlite":
        return None
    # default_store_url writes sqlite:/// + an absolute path, so the path arrives as //abs/...
    return "/" + parsed.path.lstrip("/") if parsed.path.startswith("//") else parsed.path


def check_store_url(store_url: str) -> None:
    """Refuse URLs open_store would refuse, before anything else asks for settings they do not need."""
    parsed = urlparse(store_url)
    if parsed.scheme == "sqlite":
        if parsed.netloc:
            raise StartupError(
                f"--store {store_url}: '{parsed.netloc}' is read as a host name; a SQLite URL takes a path: "
                f"sqlite:///{parsed.netloc}{parsed.path} (absolute) or sqlite:{parsed.netloc}{parsed.path} "
                "(relative to this directory)", EXIT_USAGE)
        if not parsed.path:
            raise StartupError(f"--store {store_url}: no database file; use {STORE_FORMS}", EXIT_USAGE)
        return
    if parsed.scheme in ("redis", "rediss"):
        return
    if parsed.scheme == "redis-cluster":
        from .store.redis_cluster import cluster_nodes

        try:
            cluster_nodes(store_url)
        except ValueError as exc:
            raise StartupError(f"--store {store_url}: {exc}", EXIT_USAGE) from None
        return
    raise StartupError(f"--store {store_url}: unsupported store; use {STORE_FORMS}", EXIT_USAGE)


def ensure_data_dir(store_url: str) -> None:
    """The directory of a SQLite store must exist (it is made if missing) and be writable."""
    path = sqlite_path(store_url)
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    hint = "choose another with --data-dir DIR (or CYCLES_DATA_DIR) or --store sqlite:///path/to/file.db"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)  # holds all tenant data and key hashes
    except FileExistsError:
        raise StartupError(f"data directory {directory} is a file, not a directory; {hint}", EXIT_DATA_DIR) from None
    except OSError as exc:
        raise StartupError(f"cannot create data directory {directory}: {exc.strerror}; {hint}",
                           EXIT_DATA_DIR) from None
    if not os.path.isdir(directory):
        raise StartupError(f"data directory {directory} is not a directory; {hint}", EXIT_DATA_DIR)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StartupError(f"data directory {directory} is not writable by this user; {hint}", EXIT_DATA_DIR)
    if os.path.isdir(path):
        raise StartupError(f"database path {path} is a directory; {hint}", EXIT_DATA_DIR)


def ensure_webhook_key(store_url: str) -> None:
    """Webhook signing secrets are sealed with a key the server must have before it starts. On the
    embedded store (one machine) a key file beside the database is made once and reused; servers
    sharing a Redis store must all be given the same key."""
    from .webhooks.crypto import SecretBox

    if os.environ.get(KEY_ENV) or os.environ.get(PLAINTEXT_ENV):
        try:
            SecretBox.from_env()  # a malformed key fails here, before the server starts
        except (RuntimeError, ValueError) as exc:
            raise StartupError(f"{exc}; make a new one with: {MAKE_KEY}", EXIT_CONFIG) from None
        return
    path = sqlite_path(store_url)
    if path is None:
        raise StartupError(
            f"a Redis store needs {KEY_ENV}, the same 32-byte key (base64) on every server sharing the store; "
            f"make one with: {MAKE_KEY} (or set {PLAINTEXT_ENV}=1 to keep webhook secrets unencrypted)",
            EXIT_CONFIG)
    ensure_data_dir(store_url)
    key_file = os.path.join(os.path.dirname(os.path.abspath(path)), "webhook-secret.key")
    try:
        if not os.path.exists(key_file):
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(secrets.token_bytes(32)).decode())
        with open(key_file) as f:
            os.environ[KEY_ENV] = f.read().strip()
    except OSError as exc:
        raise StartupError(f"cannot create or read {key_file}: {exc.strerror}; fix its permissions or choose "
                           "another --data-dir", EXIT_DATA_DIR) from None


def check_port(host: str, port: int) -> None:
    """Fail before anything is printed (or an operator key generated) for a server that cannot start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # SO_REUSEADDR as uvicorn sets it, so a port in TIME_WAIT is not reported as taken
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except socket.gaierror as exc:
        raise StartupError(f"--host {host}: not an address this machine has ({exc.strerror})", EXIT_PORT) from None
    except OSError as exc:
        hint = ("another process is listening there (another `cycles serve`?); stop it or pick another --port"
                if exc.errno == 98 else "pick another --host or --port")
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}; {hint}", EXIT_PORT) from None


def probe_store(store_url: str) -> None:
    """Reach a Redis store once, so an unreachable one is reported as such and not as an internal error."""
    if urlparse(store_url).scheme == "redis-cluster":
        _probe_cluster(store_url)
        return
    if urlparse(store_url).scheme not in ("redis", "rediss"):
        return
    import redis

    client = redis.Redis.from_url(store_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise classify(exc, store_url) or StartupError(f"Redis at {_where(store_url)}: {exc}",
                                                       EXIT_UNREACHABLE) from None
    finally:
        client.close()


def _probe_cluster(store_url: str) -> None:
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    from .store.redis_cluster import cluster_nodes

    try:
        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster_nodes(store_url)],
                              socket_connect_timeout=3, socket_timeout=3)
    except redis.RedisError as exc:
        raise StartupError(f"cannot reach the Redis Cluster at {store_url}: {_first_line(exc)}; start its nodes "
                           "or fix --store", EXIT_UNREACHABLE) from None
    try:
        client.ping()
    except redis.RedisError as exc:
        raise classify(exc, store_url) or StartupError(f"Redis Cluster at {store_url}: {exc}",
                                                       EXIT_UNREACHABLE) from None
    finally:
        client.close()


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]  # type: ignore[list-item]
        todo += list(getattr(e, "exceptions", ()) or ())
    return seen


def classify(exc: BaseException, store_url: str | None = None) -> StartupError | None:
    """The one-line verdict for an exception from opening or using a store, or None if it is not one."""
    try:
        import redis.exceptions as redis_errors
    except ImportError:  # pragma: no cover - redis is a dependency
        redis_errors = None  # type: ignore[assignment]
    for e in _chain(exc):
        if isinstance(e, StartupError):
            return e
        if redis_errors is not None and isinstance(e, redis_errors.AuthenticationError):
            return StartupError(f"Redis at {_where(store_url)} refused the password: {e}; fix the URL "
                                "(rediss://:PASSWORD@host:port/db)", EXIT_UNREACHABLE)
        if redis_errors is not None and isinstance(e, (redis_errors.ConnectionError, redis_errors.TimeoutError)):
            return StartupError(f"cannot connect to Redis at {_where(store_url)}: {_first_line(e)}; start "
                                "redis-server or fix --store", EXIT_UNREACHABLE)
        if isinstance(e, sqlite3.OperationalError) and "unable to open" in str(e):
            return StartupError(f"cannot open the SQLite database {sqlite_path(store_url or '') or ''}: {e}; "
                                "check that its directory exists and is writable, or choose another --data-dir",
                                EXIT_DATA_DIR)
        if isinstance(e, sqlite3.DatabaseError) and "not a database" in str(e):
            return StartupError(f"{sqlite_path(store_url or '') or 'the store file'} is not a Cycles SQLite "
                                "database; point --store or --data-dir elsewhere", EXIT_DATA_DIR)
        if isinstance(e, (PermissionError, NotADirectoryError, IsADirectoryError)):
            return StartupError(f"{e.strerror}: {e.filename}; check permissions or choose another --data-dir",
                                EXIT_DATA_DIR)
    return None


def _where(store_url: str | None) -> str:
    if not store_url:
        return "the configured URL"
    parsed = urlparse(store_url)
    return f"{parsed.hostname or 'localhost'}:{parsed.port or 6379}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__
