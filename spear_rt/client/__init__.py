"""A realtime client for spear_rt (or any OpenAI Realtime server), and the CLI built on it."""

from spear_rt.client.realtime import (
    ConnectError,
    ConnectionClosed,
    RealtimeClient,
    RealtimeError,
    ServerError,
)
from spear_rt.client.stream import Transcript, transcribe

__all__ = [
    "ConnectError",
    "ConnectionClosed",
    "RealtimeClient",
    "RealtimeError",
    "ServerError",
    "Transcript",
    "transcribe",
]
