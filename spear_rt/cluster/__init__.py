"""Scaling out: `spear-rt serve --workers N` (processes sharing one port)."""
