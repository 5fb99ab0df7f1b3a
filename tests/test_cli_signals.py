"""Signals and start-up failures of a real `spear-rt serve` process, on every loop and driver.

SIGTERM or a first SIGINT drains: the listener closes, a one-shot request in flight gets its
whole answer, a request arriving on a kept-alive connection gets 503 and the connection
closes, then the process exits 0. A second SIGINT exits at once with 130. A port in use is
one line on stderr and exit 2, like a config error.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.abc
import h11
import pytest
import trio

from tests.fakes.openai_upstream import FakeOpenAI

# (loop, driver): trio (anyio tasks), asyncio with anyio tasks, asyncio callbacks, uvloop.
LOOPS = [("trio", "auto"), ("asyncio", "anyio"), ("asyncio", "auto"), ("uvloop", "auto")]
IDS = ["trio", "asyncio-anyio", "asyncio-callbacks", "uvloop-callbacks"]
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "slow answer"}]})


def config_text(driver: str, upstream_port: int = 0) -> str:
    """A server on a free port, with the fake upstream as its one backend (or a stub)."""
    backend = (
        f'name = "up"\nkind = "openai_http"\nbase_url = "http://127.0.0.1:{upstream_port}/v1"\n'
        if upstream_port
        else 'name = "stub"\nkind = "stub"\n'
    )
    return (
        f'[server]\nlisten = "127.0.0.1:0"\ndriver = "{driver}"\n'
        f"[realtime]\ndrain_deadline_s = 7.5\n[[backends]]\n{backend}"
    )


class ServeProcess:
    """A `spear-rt serve` child process and the lines of its stderr."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stderr = b""

    @classmethod
    async def start(cls, config: Path, loop: str, *extra: str) -> ServeProcess:
        command = [sys.executable, "-m", "spear_rt.cli", "serve", "--config", str(config)]
        process = await trio.lowlevel.open_process(
            [*command, "--loop", loop, *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        return cls(process)

    async def wait_for(self, text: bytes) -> bytes:
        """Read stderr until a complete line containing `text`; returns that line."""
        assert self.process.stderr is not None
        while True:
            for line in self.stderr.splitlines(keepends=True):
                if text in line and line.endswith(b"\n"):
                    return line
            chunk = await self.process.stderr.receive_some(4096)
            assert chunk, f"server exited early: {self.stderr.decode(errors='replace')}"
            self.stderr += chunk

    async def port(self) -> int:
        line = await self.wait_for(b"listening on")
        match = re.search(rb"listening on https?://[^ ]+:(\d+) ", line)
        assert match is not None, line
        return int(match.group(1))

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


class Http:
    """One kept-alive HTTP/1.1 client connection (h11 over a real socket)."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Http:
        return cls(await anyio.connect_tcp("127.0.0.1", port))

    async def send(self, method: str, path: str, body: str = "") -> None:
        headers = [("Host", "127.0.0.1"), ("Content-Length", str(len(body.encode())))]
        if body:
            headers.append(("Content-Type", "application/json"))
        data = self.h11.send(h11.Request(method=method, target=path, headers=headers))
        data += self.h11.send(h11.Data(data=body.encode())) if body else b""
        data += self.h11.send(h11.EndOfMessage()) or b""
        await self.stream.send(data)

    async def response(self) -> tuple[int, dict[str, str], bytes] | None:
        """The next complete response, or None when the server closed the connection."""
        status, headers, body = 0, {}, b""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:  # closed before a complete response
                return None
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = b""
                self.h11.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    if headers.get("connection") != "close":
                        self.h11.start_next_cycle()
                return status, headers, body
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def closed(self) -> bool:
        """True once the server closed the connection (EOF)."""
        try:
            return await self.stream.receive() == b""
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return True


@pytest.mark.parametrize(("loop", "driver"), LOOPS, ids=IDS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_drain_answers_http_in_flight_and_refuses_new_requests(
    tmp_path: Path, loop: str, driver: str, signum: int
) -> None:
    """A one-shot request in flight at SIGTERM/SIGINT gets its whole answer; new ones 503."""
    fake = FakeOpenAI()
    config = tmp_path / "spear.toml"
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            config.write_text(config_text(driver, await nursery.start(fake.serve)))
            server = await ServeProcess.start(config, loop)
            try:
                port = await server.port()
                idle = await Http.connect(port)  # a kept-alive connection, idle at the signal
                await idle.send("GET", "/healthz")
                assert (await idle.response() or (0,))[0] == 200
                stall = fake.stall()
                busy = await Http.connect(port)
                await busy.send("POST", "/v1/chat/completions", CHAT)
                await stall.reached.wait()  # the request is in flight upstream
                server.process.send_signal(signum)
                await server.wait_for(b"draining")
                with pytest.raises(OSError):
                    await anyio.connect_tcp("127.0.0.1", port)  # the listener is closed
                await idle.send("GET", "/healthz")
                refused = await idle.response()
                assert refused is not None and refused[0] == 503
                assert refused[1]["connection"] == "close"
                assert json.loads(refused[2])["error"]["code"] == "server_draining"
                assert await idle.closed()
                stall.release()
                answer = await busy.response()
                assert answer is not None and answer[0] == 200
                assert json.loads(answer[2])["choices"][0]["message"]["content"] == (
                    "echo: slow answer"
                )
                assert await server.process.wait() == 0
            finally:
                await server.stop()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("loop", "driver"), LOOPS[:3], ids=IDS[:3])
async def test_second_sigint_exits_at_once_with_130(tmp_path: Path, loop: str, driver: str) -> None:
    """Ctrl-C twice: the first drains, the second exits 130 with the request still held."""
    fake = FakeOpenAI()
    config = tmp_path / "spear.toml"
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            config.write_text(config_text(driver, await nursery.start(fake.serve)))
            server = await ServeProcess.start(config, loop)
            stall = fake.stall()
            try:
                port = await server.port()
                busy = await Http.connect(port)
                await busy.send("POST", "/v1/chat/completions", CHAT)
                await stall.reached.wait()
                server.process.send_signal(signal.SIGINT)
                await server.wait_for(b"draining")
                server.process.send_signal(signal.SIGINT)
                assert await server.process.wait() == 130
                assert await busy.response() is None  # cut off: that is what a second ^C asks
            finally:
                await server.stop()
                stall.release()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("loop", "driver"), LOOPS, ids=IDS)
async def test_port_in_use_is_one_line_and_exit_2(tmp_path: Path, loop: str, driver: str) -> None:
    """Another socket holds the port: one line naming the address, exit code 2."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = tmp_path / "spear.toml"
    config.write_text(config_text(driver))
    try:
        with trio.fail_after(30):
            command = [sys.executable, "-m", "spear_rt.cli", "serve", "--config", str(config)]
            command += ["--loop", loop, "--listen", f"127.0.0.1:{port}"]
            result = await trio.run_process(command, capture_stderr=True, check=False)
    finally:
        taken.close()
    lines = [line for line in result.stderr.decode().splitlines() if "backend" not in line]
    assert lines == [f"spear-rt: cannot listen on 127.0.0.1:{port}: address already in use"]
    assert result.returncode == 2


@pytest.mark.parametrize(("loop", "driver"), [LOOPS[0], LOOPS[2]], ids=[IDS[0], IDS[2]])
async def test_drain_lets_a_streamed_answer_finish(tmp_path: Path, loop: str, driver: str) -> None:
    """An SSE stream in flight at SIGTERM is relayed to its end ([DONE]) before the exit."""
    fake = FakeOpenAI()
    config = tmp_path / "spear.toml"
    stream_body = json.dumps({**json.loads(CHAT), "stream": True})
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            config.write_text(config_text(driver, await nursery.start(fake.serve)))
            server = await ServeProcess.start(config, loop)
            slow = fake.slow_stream()
            try:
                port = await server.port()
                busy = await Http.connect(port)
                await busy.send("POST", "/v1/chat/completions", stream_body)
                slow.release()  # the role chunk: the stream is open end to end
                busy.h11.receive_data(await busy.stream.receive())  # its first bytes came
                server.process.send_signal(signal.SIGTERM)
                await server.wait_for(b"draining")
                slow.release(100)
                answer = await busy.response()
                assert answer is not None and answer[0] == 200
                assert answer[2].endswith(b"data: [DONE]\n\n")
                events = [e[6:] for e in answer[2].decode().split("\n\n") if e[6:]]
                deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
                assert "".join(d.get("content", "") for d in deltas) == "echo: slow answer"
                assert await server.process.wait() == 0
            finally:
                await server.stop()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("loop", "driver"), [("trio", "auto"), ("uvloop", "auto")], ids=["trio", "uvloop"]
)
async def test_sigusr1_prints_every_threads_stack_and_the_server_goes_on(
    tmp_path: Path, loop: str, driver: str
) -> None:
    """For a server that seems stuck: its stacks on stderr, and it still answers."""
    config = tmp_path / "stub.toml"
    config.write_text(config_text(driver))
    server = await ServeProcess.start(config, loop)
    try:
        with trio.fail_after(30):
            port = await server.port()
            server.process.send_signal(signal.SIGUSR1)
            await server.wait_for(b"most recent call first")
            http = await Http.connect(port)
            await http.send("GET", "/healthz")
            answer = await http.response()
            assert answer is not None and answer[0] == 200
    finally:
        await server.stop()
