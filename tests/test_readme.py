"""The README's first steps, run as written: its fenced blocks, against a fresh `cycles serve` process.

Each step is shown with curl and with the CLI; both walks run (one fresh server each, as a new user
would start one). The only edits are the port (7878 -> a free one) and the operator key placeholder
(-> the key the server printed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support import free_port

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```$", re.S | re.M)


def walk_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## First steps"):text.index("### The runtime commands")]
    return [(info.strip(), body) for info, body in FENCE.findall(section)]


def script_for(flavor: str, port: int, admin_key: str) -> str:
    lines = []
    for info, body in walk_blocks():
        if info == "sh" or info == f"sh {flavor}":
            lines.append(body)
        elif info == "python":  # "Save it as guarded.py and run `python guarded.py`"
            lines.append(f"cat > guarded.py <<'PY'\n{body}PY\npython guarded.py\n")
    script = "\n".join(lines).replace("7878", str(port))
    return re.sub(r"CYCLES_ADMIN_API_KEY=cyc_admin_\.\.\.", f"CYCLES_ADMIN_API_KEY={admin_key}", script)


def start_fresh_server(tmp: Path, port: int) -> tuple[subprocess.Popen, str]:
    """`cycles serve` on a fresh data dir, as the README's first command runs it; returns the printed key."""
    log = tmp / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYCLES_")}
    env.update(CYCLES_DATA_DIR=str(tmp / "data"), HOME=str(tmp))
    proc = subprocess.Popen([str(Path(sys.executable).with_name("cycles")), "serve", "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/actuator/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise AssertionError(log.read_text())
    out = log.read_text().splitlines()
    key = out[out.index(next(ln for ln in out if "shown only this once" in ln)) + 1].strip()
    return proc, key


def test_the_walk_has_both_flavors_of_every_step() -> None:
    infos = [info for info, _ in walk_blocks()]
    assert infos.count("sh curl") == infos.count("sh cli") == 6 and "python" in infos


@pytest.mark.parametrize("flavor", ["curl", "cli"])
def test_readme_first_steps(flavor: str, tmp_path: Path) -> None:
    port = free_port()
    proc, admin_key = start_fresh_server(tmp_path, port)
    try:
        work = tmp_path / "checkout"
        work.mkdir()
        (work / ".venv").symlink_to(sys.prefix)  # the venv the README's first command made
        (work / "walk.sh").write_text(script_for(flavor, port, admin_key))
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
        run = subprocess.run(["bash", "-eu", "-o", "pipefail", "walk.sh"], cwd=work, env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "charged 1300000" in run.stdout
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-Admin-API-Key": admin_key}) as c:
            budget = c.get("/v1/admin/budgets/lookup",
                           params={"tenant_id": "acme", "scope": "tenant:acme", "unit": "USD_MICROCENTS"}).json()
        assert budget["spent"]["amount"] == 4_200_000 + 1_300_000
        assert budget["reserved"]["amount"] == 0 and budget["remaining"]["amount"] == 94_500_000
    finally:
        proc.terminate()
        proc.wait(10)
