"""File modes of the embedded store: the database holds every tenant's data and key hashes."""

from __future__ import annotations

import os


def create_private(path: str) -> None:
    """Create the database's directory (0700) and an empty database file (0600) if they are missing.

    SQLite gives the -wal and -shm files the mode of the database file, so creating the (empty, and
    so valid) database file first with 0600 keeps all three private whatever the umask. Files that
    already exist are left as the operator set them."""
    if path == ":memory:" or path.startswith("file:"):
        return
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:
        pass  # unwritable place: opening the store reports it, as a store error with the path
