"""Is the operator key (CYCLES_ADMIN_API_KEY) guessable? A weak key is still accepted, since the public
demos configure `demo-admin-key`, but the server says so at start and in /actuator/health."""

from __future__ import annotations

MIN_LENGTH = 20
MIN_DISTINCT = 8
# Values that appear in demos, docs and tutorials, which are the first ones an attacker tries.
WELL_KNOWN = frozenset({"demo-admin-key", "admin", "admin-key", "adminkey", "changeme", "change-me", "password",
                        "secret", "test", "test-key", "dev", "dev-key", "local", "cycles", "cycles-admin"})


def weak_reasons(configured: str | None) -> list[str]:
    """Why each configured admin key (comma-separated, as the authenticator reads them) is weak.
    The reasons never contain the key itself."""
    if not configured:
        return []
    keys = [k.strip() for k in configured.split(",") if k.strip()]
    reasons = []
    for i, key in enumerate(keys, 1):
        which = "CYCLES_ADMIN_API_KEY" if len(keys) == 1 else f"CYCLES_ADMIN_API_KEY (key {i} of {len(keys)})"
        if key.lower() in WELL_KNOWN:
            reasons.append(f"{which} is a well-known default value")
        elif len(key) < MIN_LENGTH:
            reasons.append(f"{which} has {len(key)} characters (fewer than {MIN_LENGTH})")
        elif len(set(key)) < MIN_DISTINCT:
            reasons.append(f"{which} uses only {len(set(key))} distinct characters")
    return reasons


def warning_text(reasons: list[str]) -> str:
    return ("WARNING: weak operator key: " + "; ".join(reasons) + ". Anyone who guesses it controls every tenant; "
            "use a long random value, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`.")
