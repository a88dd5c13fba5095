"""Webhook subscriptions and delivery: the shared pieces (secret sealing, URL policy)."""
