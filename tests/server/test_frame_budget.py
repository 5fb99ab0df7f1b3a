"""Incomplete WebSocket frames are bounded across connections (`max_frame_bytes_in_flight`).

`max_frame_bytes` bounds one connection; many connections each holding a frame just short of
complete used to hold sessions x max_frame_bytes (300 x 1 MiB: +269 MB that stayed).
"""

from __future__ import annotations

from typing import Any

import pytest
from websockets.frames import Frame, Opcode

from spear_rt.server.app import Server
from spear_rt.server.ws import FrameBudget
from tests.conftest import DRIVERS, IDS, WsClient, run_on
from tests.server.test_resume import until

FRAME = 60_000  # announced payload of each frame
SENT = 50_000  # of which each connection sends this much, then stalls
LIMITS = "max_frame_bytes = 65536\nmax_frame_bytes_in_flight = 131072"


def partial_frame() -> bytes:
    """A masked client text frame of FRAME bytes, cut after SENT payload bytes."""
    wire = Frame(Opcode.TEXT, b"x" * FRAME).serialize(mask=True)
    return wire[: len(wire) - (FRAME - SENT)]


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_partial_frames_past_the_budget_are_refused_1013_and_given_back(
    backend: str, driver: str
) -> None:
    """Two stalled frames fit, a third closes 1013; ended connections give their bytes back."""

    async def scenario(server: Server) -> dict[str, Any]:
        budget = server.frame_budget
        clients = [await WsClient.connect(server.port) for _ in range(3)]
        for client in clients:
            await client.recv()  # session.created: the handshake is done
        for client in clients[:2]:
            await client.stream.send(partial_frame())
        await until(lambda: budget.held >= 2 * SENT)
        held_two = budget.held
        await clients[2].stream.send(partial_frame())
        code, reason = await clients[2].wait_closed()
        for client in clients[:2]:
            await client.stream.aclose()
        await until(lambda: budget.held == 0)
        fresh = await WsClient.connect(server.port)  # room again
        await fresh.recv()
        await fresh.stream.send(partial_frame())
        await until(lambda: budget.held >= SENT)
        await fresh.stream.aclose()
        await until(lambda: budget.held == 0)
        return {"held_two": held_two, "code": code, "reason": reason}

    result = run_on(backend, driver, scenario, LIMITS)
    assert 2 * SENT <= result["held_two"] < 2 * SENT + 1024
    assert result["code"] == 1013 and "too many large frames" in result["reason"]


def test_the_budget_refuses_growth_past_its_limit_and_takes_shrinking() -> None:
    """A counter: growth that would pass the limit is refused and changes nothing."""
    budget = FrameBudget(100)
    assert budget.update(0, 60) and budget.held == 60
    assert not budget.update(0, 50) and budget.held == 60
    assert budget.update(60, 10) and budget.held == 10
    assert budget.update(0, 90) and budget.held == 100
    assert budget.update(90, 0) and budget.update(10, 0) and budget.held == 0
