"""Durable jobs: the SQLite job store, SSE formatting, webhook delivery and x0 previews (no Ray in here)."""
