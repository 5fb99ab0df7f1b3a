"""Helpers for the client tests: a real server on an ephemeral loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from spear_rt.config import BackendConfig, Config, ServerConfig
from spear_rt.server.app import Server

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "audio"


def stub_config(**server: object) -> Config:
    """A config whose only backend is the deterministic stub, listening on 127.0.0.1:0."""
    return Config(
        server=ServerConfig(listen="127.0.0.1:0", **server),  # type: ignore[arg-type]
        backends=[BackendConfig(name="stub", kind="stub")],
        source="test: stub only",
    )


@asynccontextmanager
async def running_server(config: Config) -> AsyncIterator[str]:
    """Serve `config` in a nursery; yields the transcription URL; cancels the server on exit."""
    server = Server(config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        yield f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
        nursery.cancel_scope.cancel()
