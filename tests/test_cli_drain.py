"""SIGTERM (or a first SIGINT) on a real `spear-rt serve` process: the drain, end to end.

The listener closes at once (new connections are refused), live sessions get
`spear.server.draining {deadline_ms}`, an open turn is committed and its transcript
delivered, the session closes 1001, and the process exits 0.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import trio

from tests.conftest import WsClient, b64, noise_pcm
from tests.server.test_realtime import BETA, COMPLETED, MANUAL_BETA, TRANSCRIPTION

CONFIG = """
[server]
listen = "127.0.0.1:0"
[realtime]
drain_deadline_s = 7.5
[[backends]]
name = "stub"
kind = "stub"
"""


async def read_port(process: trio.Process) -> int:
    """The port from the server's 'listening on http://HOST:PORT' line on stderr."""
    assert process.stderr is not None
    seen = b""
    while b"listening on" not in seen or not seen.endswith(b"\n"):
        chunk = await process.stderr.receive_some(4096)
        assert chunk, f"server exited early: {seen.decode(errors='replace')}"
        seen += chunk
    match = re.search(rb"listening on http://[^:]+:(\d+)", seen)
    assert match is not None
    return int(match.group(1))


@pytest.mark.parametrize("loop", ["trio", "asyncio", "uvloop"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_drains_live_sessions_then_exits(
    tmp_path: Path, loop: str, signum: int
) -> None:
    """SIGTERM, and a first SIGINT (Ctrl-C) alike: the session is drained, closed 1001."""
    config = tmp_path / "spear.toml"
    config.write_text(CONFIG)
    command = [sys.executable, "-m", "spear_rt.cli", "serve", "--config", str(config)]
    command += ["--loop", loop]
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            port = await read_port(process)
            client = await WsClient.connect(port, TRANSCRIPTION, headers=BETA)
            await client.recv()
            await client.send(MANUAL_BETA)
            await client.recv()
            await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(9600))})
            await client.send({"type": "spear.metrics.request"})
            await client.recv_until("spear.metrics")  # the append was applied: a turn is open
            process.send_signal(signum)
            events = await client.recv_all()
            code, reason = await client.wait_closed()
            with pytest.raises(OSError):
                await anyio.connect_tcp("127.0.0.1", port)  # the listener is gone
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    kinds = [e["type"] for e in events if not e["type"].endswith(".delta")]
    assert kinds == [
        "spear.server.draining",
        "input_audio_buffer.committed",
        "conversation.item.created",
        COMPLETED,
    ]
    draining = next(e for e in events if e["type"] == "spear.server.draining")
    assert draining["deadline_ms"] == 7500
    assert events[-1]["transcript"].count(" ") == 1  # two stub words
    assert (code, reason) == (1001, "server draining")
