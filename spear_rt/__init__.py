"""spear_rt: a realtime voice gateway (OpenAI Realtime protocol, capability routing)."""

__version__ = "0.1.0"
