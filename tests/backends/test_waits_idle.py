"""`waits_idle`: what anyio's statistics say, read without building them, in every state."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectSendStream

from spear_rt.backend import waits_idle


def by_statistics(tx: MemoryObjectSendStream[Any]) -> bool:
    stats = tx.statistics()
    return stats.current_buffer_used == 0 and stats.tasks_waiting_receive > 0


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_waits_idle_agrees_with_the_statistics(backend: str) -> None:
    async def main() -> list[bool]:
        seen: list[bool] = []
        tx, rx = anyio.create_memory_object_stream[int](2)
        clone = tx.clone()

        def note() -> None:
            assert waits_idle(tx) == waits_idle(clone) == by_statistics(tx)
            seen.append(waits_idle(tx))

        note()  # nobody receives, nothing buffered
        tx.send_nowait(1)
        note()  # buffered, nobody receives
        assert rx.receive_nowait() == 1
        got: list[int] = []
        async with anyio.create_task_group() as tg:
            waiting = anyio.Event()

            async def receive() -> None:
                waiting.set()
                got.append(await rx.receive())

            tg.start_soon(receive)
            await waiting.wait()
            await anyio.wait_all_tasks_blocked()
            note()  # a receiver waits, nothing buffered: the one True
            tx.send_nowait(2)
            note()  # handed to the receiver, which has not woken yet
        note()  # taken
        assert got == [2]
        return seen

    assert anyio.run(main, backend=backend) == [False, False, True, False, False]
