"""The published runcycles SDK in its own virtualenv (`.venv-conformance`), made on first use.

Shared by the conformance suite and tests/client/test_compat.py, so no test depends on another
having created the venv first (a fresh checkout runs them all; see README "Tests")."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-conformance"
PYTHON = VENV / "bin" / "python"
SDK_VERSION = "0.5.3"


def _ready(py: Path) -> bool:
    if not py.exists():
        return False
    probe = f"import runcycles; assert runcycles.__version__ == {SDK_VERSION!r}"
    return subprocess.run([str(py), "-c", probe], capture_output=True, timeout=60).returncode == 0


def ensure_runcycles() -> str:
    """The venv's python, creating the venv and installing runcycles==0.5.3 from the package index if needed."""
    # Parallel test workers (pytest -n) would build the venv at once: one builds, the others wait.
    with open(ROOT / ".venv-conformance.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure()


def _ensure() -> str:
    if not _ready(PYTHON):
        base = shutil.which("python3") or "python3"
        subprocess.run([base, "-m", "venv", str(VENV)], check=True, timeout=300)
        install = subprocess.run(
            [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             f"runcycles=={SDK_VERSION}"], capture_output=True, text=True, timeout=600)
        if install.returncode != 0:
            pytest.fail(f"pip install runcycles=={SDK_VERSION} failed (the conformance tests need the published "
                        f"SDK from the package index):\n{install.stdout}\n{install.stderr}")
        if not _ready(PYTHON):
            pytest.fail(f"runcycles {SDK_VERSION} is not importable from {PYTHON} after installation")
    return str(PYTHON)
