"""A realtime client for spear_rt (or any OpenAI Realtime server), and the CLI built on it.

`SpearResume` (resume with the official `openai` package) is imported on first use, so this
package does not need `openai` installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spear_rt.client.realtime import (
    ConnectError,
    ConnectionClosed,
    RealtimeClient,
    RealtimeError,
    ResumeError,
    ServerError,
)
from spear_rt.client.resuming import ResumePolicy, ResumingClient
from spear_rt.client.stream import Transcript, transcribe

if TYPE_CHECKING:
    from spear_rt.client.openai_resume import SpearResume

__all__ = [
    "ConnectError",
    "ConnectionClosed",
    "RealtimeClient",
    "RealtimeError",
    "ResumeError",
    "ResumePolicy",
    "ResumingClient",
    "ServerError",
    "SpearResume",
    "Transcript",
    "transcribe",
]


def __getattr__(name: str) -> Any:
    """Import `SpearResume` (and with it `openai`) only when asked for."""
    if name == "SpearResume":
        from spear_rt.client.openai_resume import SpearResume

        return SpearResume
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
