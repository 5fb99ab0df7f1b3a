"""Drain with a client's manual turn open, on every driver (server.sessions.drain, the entry
point SIGTERM uses): the turn takes the client's last audio and its commit, is answered, and
the session closes 1001; no `session_draining` for the turn that was open."""

from __future__ import annotations

from typing import Any

import pytest

from spear_rt.server.app import Server
from tests.conftest import b64, noise_pcm
from tests.server.test_bad_events import DRIVERS, IDS, run
from tests.server.test_realtime import COMMITTED, COMPLETED, open_manual


@pytest.mark.parametrize(("loop", "driver"), DRIVERS, ids=IDS)
def test_an_open_manual_turn_at_drain_is_committed_and_answered(loop: str, driver: str) -> None:
    async def scenario(server: Server) -> tuple[list[dict[str, Any]], int | None]:
        assert server.port is not None
        client = await open_manual(server.port)
        await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(4800))})
        await client.recv()  # a delta (early deltas in open_manual): the turn is open
        server.sessions.drain(5.0)
        assert (await client.recv())["type"] == "spear.server.draining"
        await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(4800, 2))})
        await client.send({"type": "input_audio_buffer.commit"})
        events = await client.recv_all()
        code, _ = await client.wait_closed()
        # Close the client's stream: dropping a uvloop transport that has just half-closed
        # (write_eof, its uv_shutdown still queued) frees it under libuv's feet; uvloop 0.23
        # then segfaults in __uv_stream_on_shutdown (a uvloop use-after-free).
        await client.close()
        return events, code

    events, code = run(loop, driver, scenario)
    kinds = [e["type"] for e in events]
    assert "error" not in kinds, events
    assert [k for k in kinds if k in (COMMITTED, COMPLETED)] == [COMMITTED, COMPLETED]
    assert events[-1]["transcript"].count(" ") == 1  # both appends are in the item
    assert code == 1001
