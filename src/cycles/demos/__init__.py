"""The two demos, one command each: `cycles demo runaway` and `cycles demo action-authority`.

Each demo starts our server on a temporary embedded store in this process (or uses an existing server
given by CYCLES_BASE_URL with CYCLES_API_KEY or CYCLES_ADMIN_API_KEY), provisions what it needs through
the admin API exactly like the public demos' provisioning script, runs the scenario with our SDK
(`cycles.client`, the `@cycles` decorator), shows it live with `rich`, and cleans up.
"""
