"""The operator CLI: `cycles admin ...` and `cycles apply FILE.yaml`, clients of the admin API."""
