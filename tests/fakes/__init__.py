"""Fake upstreams that speak real wire formats over loopback (for backend and server tests)."""
