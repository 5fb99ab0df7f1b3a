"""Upstream SPEAR's guests on spear_rt (spear-guests.md §10): C programs against `spear.h`,
compiled with clang, run through the real wasmtime binding against a running server.

What must hold: ``log`` lines come out whole and in order; ``time_now_ms`` is the wall clock;
a ``cchat_*`` request goes through the one-shot path (the same answer as POST
/v1/chat/completions, plus ``_spear``); with AUTO_TOOL_CALL the host calls the guest's own
function through its table with the spec's tool arena, and the model gets its output; an
import this host does not provide instantiates and answers -ENOSYS.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

from spear_rt.hostcalls import cli, ssf
from spear_rt.hostcalls.abi import EIO, ENOSYS
from spear_rt.hostcalls.guest import guest_host, routed_send, run_guest
from spear_rt.hostcalls.link import loop_waker
from spear_rt.hostcalls.wasm import GuestError, audio_file_source
from spear_rt.server.app import Server
from tests.conftest import (
    FIXTURES,
    HandshakeRefused,
    ServerFactory,
    WsClient,
    load_fixture_24k,
    make_config,
)
from tests.hostcalls.cguests import build


class Lines:
    """A log sink: every ``log`` call as (level, text)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, level: str, text: str) -> None:
        self.calls.append((level, text))

    def info(self) -> list[str]:
        return [text for level, text in self.calls if level == "info"]

    def value(self, prefix: str) -> str:
        """The rest of the one info line starting with `prefix` (its newline dropped)."""
        found = [t for t in self.info() if t.startswith(prefix)]
        assert len(found) == 1, (prefix, self.info())
        return found[0][len(prefix) :].removesuffix("\n")


async def run_c(name: str, server: Server) -> Lines:
    lines = Lines()
    await run_guest(build(name), server.sessions, oneshot=server.oneshot.handle, log_sink=lines)
    return lines


async def test_hello_logs_its_greeting_and_the_wall_clock(server: Server) -> None:
    before = time.time_ns() // 1_000_000
    lines = await run_c("hello", server)
    after = time.time_ns() // 1_000_000
    assert lines.info()[0] == "hello spear wasm\n"
    assert before <= int(lines.value("time_now_ms: ")) <= after


async def test_chat_completion_answers_as_the_http_endpoint_does(server: Server) -> None:
    lines = await run_c("chat_completion", server)
    assert lines.value("debug_model=") == "gpt-4o-mini"
    body = json.loads(lines.value("response_json="))
    assert int(lines.value("response_bytes=")) == len(lines.value("response_json=").encode())
    assert body.pop("_spear") == {"backend": "stub", "model": "gpt-4o-mini"}
    assert lines.value("debug_backend=") == "stub"
    request = {"model": "gpt-4o-mini",
               "messages": [{"role": "user", "content": "Hi, what is your name?"}]}  # fmt: skip
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"http://127.0.0.1:{server.port}/v1/chat/completions", json=request
        )
    assert answer.status_code == 200
    assert body == answer.json()  # the same path: normalize, router, backend


TOOL_STUB = '[[backends]]\nname = "stub"\nkind = "stub"\nfeatures = ["supports_tools"]\n'


async def test_the_host_runs_the_tool_loop_through_the_guests_function(
    serve: ServerFactory,
) -> None:
    server = await serve(make_config(backends=TOOL_STUB))
    lines = await run_c("chat_tool_sum", server)
    assert lines.value("tool_fn_offset=") != "0"
    assert lines.value("cchat_write_fn_rc=") == "0"
    # the spec's arena: 128 KiB gives the callback 65536 bytes of output
    assert lines.value("sum invoked: ") == "a=7 b=35 sum=42 cap=65536"
    [response] = [t for t in lines.info() if t.startswith("chat response (")]
    head, text = response.split(":\n", 1)
    body = json.loads(text)
    assert head == f"chat response ({len(text.rstrip(chr(10)).encode())} bytes)"
    assert body["choices"][0]["message"]["content"] == 'stub: after tool {"sum":42}'
    assert body["_spear"]["backend"] == "stub"
    usage = json.loads(lines.value("usage="))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


MISSING = """
(module
  (import "spear" "hologram_create" (func $hologram_create (result i32)))
  (import "spear" "hologram_open" (func $open (param i32 i32) (result i32)))
  (import "spear" "spear_fd_ctl" (func $fd_ctl (param i32 i32 i32 i32) (result i32)))
  (import "spear" "wall_time_s" (func $wall (result i64)))
  (memory (export "memory") 1)
  (func (export "create") (result i32) (call $hologram_create))
  (func (export "open") (result i32) (call $open (i32.const 1) (i32.const 3)))
  (func (export "wall") (result i64) (call $wall)))
"""


async def test_an_import_the_host_lacks_instantiates_and_answers_enosys(server: Server) -> None:
    async with guest_host(MISSING, server.sessions) as run:
        assert await run.call("create") == -ENOSYS
        assert await run.call("open") == -ENOSYS
        wall: Any = await run.call("wall")
        assert abs(wall - time.time()) < 5


def test_run_wasm_prints_the_guests_log_lines(capsys: Any) -> None:
    assert cli.main([str(build("hello")), "--loop", "trio"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "hello spear wasm"
    assert out.splitlines()[1].startswith("time_now_ms: 1")
    assert "hello" in err and "fuel used" in err


ASR_BACKEND = '[[backends]]\nname = "openai-realtime-asr"\nkind = "stub"\n'


async def test_mic_rtasr_transcribes_the_host_recording_and_ends_after_it(
    serve: ServerFactory, tmp_path: Path
) -> None:
    server = await serve(make_config(backends=ASR_BACKEND))
    lines, stdout = Lines(), tmp_path / "stdout.txt"
    audio = audio_file_source(FIXTURES / "speech_go_forward.wav")
    with anyio.fail_after(30):
        await run_guest(
            build("mic_rtasr"), server.sessions, audio=audio, log_sink=lines, stdout=str(stdout)
        )
    assert "mic_rtasr started\n" in lines.info()
    # the recording ended: the session drained, the guest read it all, then the mic hung up
    assert lines.info()[-1] == "mic hup\n"
    assert "event_type=input_audio_buffer.committed\n" in lines.info()
    printed = stdout.read_text().splitlines()
    *deltas, transcript = printed
    assert transcript and "".join(deltas) == transcript  # every delta, then the transcript


async def test_mic_rtasr_without_a_recording_fails_its_setup_clearly(server: Server) -> None:
    lines = Lines()
    with pytest.raises(GuestError, match="exited with status 1"):
        await run_guest(build("mic_rtasr"), server.sessions, log_sink=lines)
    assert lines.value("mic_ctl failed: ") == str(-EIO)
    status = json.loads(lines.value("mic_status: "))
    assert status["running"] is False and "no audio device" in status["last_error"]


class Started(Lines):
    """A log sink that also signals the guest's start line."""

    def __init__(self, start_line: str) -> None:
        super().__init__()
        self.start_line = start_line
        self.started = anyio.Event()
        self.call_soon = loop_waker()

    def __call__(self, level: str, text: str) -> None:
        super().__call__(level, text)
        if text.startswith(self.start_line):
            self.call_soon(self.started.set)  # from the guest's thread


@asynccontextmanager
async def echo_guest(server: Server) -> AsyncIterator[tuple[Started, str]]:
    """user_stream_echo running against `server`: (its log, its streams path), once started."""
    lines = Started("user_stream_echo started")
    runs: list[Any] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            partial(
                run_guest,
                build("user_stream_echo"),
                server.sessions,
                log_sink=lines,
                executions=server.executions,
                on_start=runs.append,
            )
        )
        await lines.started.wait()
        yield lines, f"/api/v1/executions/{runs[0].streams.execution_id}/streams/ws"


async def test_user_stream_echo_sends_every_frame_back_and_ends_with_the_socket(
    server: Server,
) -> None:
    assert server.port is not None
    with anyio.fail_after(30):
        async with echo_guest(server) as (lines, path):
            client = await WsClient.connect(server.port, path)
            frames = [ssf.build(1, b"hello", seq=1), ssf.build(1, b"x" * 70000, seq=2),
                      ssf.build(7, b"", meta=b'{"k":1}', seq=3)]  # fmt: skip
            for frame in frames:
                await client.send_bytes(frame)
            echoed = [await client.recv_bytes() for _ in frames]
            assert sorted(echoed) == sorted(frames)  # byte-identical, per stream in order
            assert [f for f in echoed if ssf.parse(f).stream_id == 1] == frames[:2]
            await client.close()
    assert lines.info()[-1] == "session closed\n"
    assert "stream connected: stream_id=1 fd=" in "".join(lines.info())
    assert "stream connected: stream_id=7 fd=" in "".join(lines.info())


async def test_a_user_streams_socket_is_refused_for_bad_frames_and_unknown_runs(
    server: Server,
) -> None:
    assert server.port is not None
    with pytest.raises(HandshakeRefused) as info:
        await WsClient.connect(server.port, "/api/v1/executions/exec_nope/streams/ws")
    assert info.value.response.status_code == 404
    with anyio.fail_after(30):
        async with echo_guest(server) as (lines, path):
            client = await WsClient.connect(server.port, path)
            second = await WsClient.connect(server.port, path)
            assert (await second.wait_closed())[0] == 1008  # one client per execution
            await client.send_bytes(b"SPST garbage")
            code, reason = await client.wait_closed()
            assert code == 1008 and "SSF" in reason
    assert lines.info()[-1] == "session closed\n"


async def test_run_wasm_listen_prints_the_streams_url_before_the_guest_starts(
    tmp_path: Path,
) -> None:
    config = tmp_path / "stub.toml"
    config.write_text('[[backends]]\nname = "stub"\nkind = "stub"\n')
    command = [sys.executable, "-m", "spear_rt.hostcalls.cli", str(build("user_stream_echo")),
               "--listen", "127.0.0.1:0", "--config", str(config),
               "--loop", "asyncio"]  # fmt: skip  # the callback driver; serve --wasm runs trio
    with anyio.fail_after(60):
        async with await anyio.open_process(command) as process:
            assert process.stdout is not None
            seen = b""
            while b"waiting for user streams" not in seen:
                seen += await process.stdout.receive()
            first, second = seen.decode().splitlines()[:2]
            assert first.startswith("user streams: ws://127.0.0.1:")
            assert second == "user_stream_echo started (waiting for user streams)"
            url = urlsplit(first.removeprefix("user streams: "))
            assert url.port is not None and url.port > 0
            client = await WsClient.connect(url.port, url.path)
            frame = ssf.build(3, b"ping")
            await client.send_bytes(frame)
            assert await client.recv_bytes() == frame
            await client.close()
            rest = b""
            async for chunk in process.stdout:
                rest += chunk
            assert await process.wait() == 0
    assert "session closed" in rest.decode()


async def test_the_one_shot_families_answer_as_the_http_endpoints_do(server: Server) -> None:
    await check_families(server, "stub")


async def test_the_one_shot_families_over_a_real_upstream(serve: Any, nursery: Any) -> None:
    """The same through an `openai_http` instance (the fake upstream), not the stub."""
    from tests.fakes.openai_upstream import FakeOpenAI

    up = FakeOpenAI()
    await nursery.start(up.serve)
    backend = f'[[backends]]\nname = "up"\nkind = "openai_http"\nbase_url = "{up.base_url}"\n'
    await check_families(await serve(make_config(backends=backend)), "up")
    paths = {r.path for r in up.requests}
    assert {"/v1/audio/speech", "/v1/audio/transcriptions", "/v1/embeddings",
            "/v1/images/generations"} <= paths  # fmt: skip


async def check_families(server: Server, backend: str) -> None:
    """oneshot_families' answers equal the HTTP endpoints' for the same requests."""
    lines = await run_c("oneshot_families", server)
    base = f"http://127.0.0.1:{server.port}/v1"
    async with httpx.AsyncClient() as client:
        speech = await client.post(
            f"{base}/audio/speech",
            json={
                "model": "tts-1",
                "input": "open the window",
                "voice": "alloy",
                "response_format": "wav",
            },
        )
        heard = await client.post(
            f"{base}/audio/transcriptions",
            data={"model": "whisper-1", "response_format": "json"},
            files={"file": ("audio", speech.content)},
        )
        embedded = await client.post(
            f"{base}/embeddings",
            json={"model": "text-embedding-3-small", "input": "open the window", "dimensions": 4},
        )
    assert int(lines.value("tts_bytes=")) == len(speech.content) > 1000
    tts = json.loads(lines.value("tts_status="))
    assert tts == {"status": 200, "content_type": "audio/wav", "backend": backend,
                   "bytes": len(speech.content)}  # fmt: skip
    assert json.loads(lines.value("asr_json=")) == heard.json()
    assert json.loads(lines.value("emb_json=")) == embedded.json()
    assert json.loads(lines.value("img_status="))["status"] == 200


async def test_one_epoll_loop_streams_a_chat_answer_and_a_transcription(server: Server) -> None:
    from tests.hostcalls.test_wasm import over_websocket

    assert server.port is not None
    pcm = load_fixture_24k("speech_open_window.wav")
    lines = Lines()
    await run_guest(
        build("chat_and_rt"),
        server.sessions,
        audio=pcm.astype("<i2").tobytes(),
        oneshot=server.oneshot.handle,
        log_sink=lines,
    )
    texts = [t.removeprefix("chat text: ").removesuffix("\n") for t in lines.info()
             if t.startswith("chat text: ")]  # fmt: skip
    question = [{"role": "user", "content": "what is the capital of France"}]
    request = {"model": "gpt-4o-mini", "messages": question}
    async with httpx.AsyncClient() as client:
        whole = await client.post(
            f"http://127.0.0.1:{server.port}/v1/chat/completions", json=request
        )
    assert "".join(texts) == whole.json()["choices"][0]["message"]["content"]
    done = lines.value("chat done after ")
    assert done.startswith(f"{len(texts)} reads, usage ") and '"total_tokens"' in done
    event = json.loads(lines.value("transcript event: "))
    _deltas, expected = await over_websocket(server.port, pcm, 4800)
    assert event["transcript"] == expected  # the same session as a WebSocket client's


async def test_serve_runs_a_guest_and_serves_its_user_streams_on_its_port(
    tmp_path: Path,
) -> None:
    config = tmp_path / "stub.toml"
    config.write_text('[[backends]]\nname = "stub"\nkind = "stub"\n')
    spear = str(Path(sys.executable).parent / "spear-rt")
    guest = str(build("user_stream_echo"))
    command = [spear, "serve", "--listen", "127.0.0.1:0", "--config", str(config),
               "--loop", "trio", "--wasm", guest]  # fmt: skip
    with anyio.fail_after(60):
        async with await anyio.open_process(command) as process:
            assert process.stderr is not None
            said = b""
            while b"waiting for user streams" not in said:
                said += await process.stderr.receive()
            [line] = [x for x in said.decode().splitlines() if "user streams: " in x]
            url = urlsplit(line.split("user streams: ", 1)[1])
            assert url.port is not None
            client = await WsClient.connect(url.port, url.path)
            frame = ssf.build(2, b"inside serve")
            await client.send_bytes(frame)
            assert await client.recv_bytes() == frame
            await client.close()
            while b"ended (fuel used" not in said:
                said += await process.stderr.receive()
            assert b"wasm user_stream_echo" in said and b"session closed" in said
            async with httpx.AsyncClient() as http:  # the guest ended; the server did not
                health = await http.get(f"http://127.0.0.1:{url.port}/healthz")
            assert health.status_code == 200
            process.terminate()
            assert await process.wait() == 0


async def test_an_mcp_guest_runs_its_chat_without_mcp_servers(server: Server) -> None:
    lines = await run_c("mcp_fs", server)
    assert not [t for t in lines.info() if " failed: " in t]  # every mcp.* param was taken
    body = json.loads(lines.value("response_json="))
    assert body["_spear"]["backend"] == "stub"
    assert body["choices"][0]["message"]["content"].startswith("stub: ")
    assert int(lines.value("response_bytes=")) == len(lines.value("response_json=").encode())


async def test_a_stream_answered_to_a_whole_request_is_closed_and_refused() -> None:
    closed: list[bool] = []

    class Chunks:
        async def aclose(self) -> None:
            closed.append(True)

    async def handle(request: Any) -> Any:
        return SimpleNamespace(response=SimpleNamespace(stream=Chunks()), headers=[])

    send = routed_send(handle, None)
    sent = await anyio.to_thread.run_sync(send, "/v1/embeddings", "application/json", b"{}",
                                          None, None)  # fmt: skip
    assert sent.status == 502 and b"unexpected_stream" in sent.body and closed == [True]


async def test_a_streamed_chat_from_a_real_upstream_reaches_the_guest_as_it_arrives(
    serve: Any, nursery: Any
) -> None:
    """chat_and_rt's streaming chat fd over an `openai_http` instance (the fake upstream's SSE),
    not the stub: the guest's text is the upstream's answer, asked for with stream: true."""
    from tests.fakes.openai_upstream import FakeOpenAI

    up = FakeOpenAI()
    await nursery.start(up.serve)
    backends = (
        f'[[backends]]\nname = "up"\nkind = "openai_http"\nbase_url = "{up.base_url}"\n'
        'ops = ["chat_completions"]\n'
        '[[backends]]\nname = "stub"\nkind = "stub"\nops = ["speech_to_text", "realtime_voice"]\n'
    )
    server = await serve(make_config(backends=backends))
    lines = Lines()
    with anyio.fail_after(60):
        await run_guest(
            build("chat_and_rt"),
            server.sessions,
            audio=load_fixture_24k("speech_open_window.wav").astype("<i2").tobytes(),
            oneshot=server.oneshot.handle,
            log_sink=lines,
        )
    texts = [t.removeprefix("chat text: ").removesuffix("\n") for t in lines.info()
             if t.startswith("chat text: ")]  # fmt: skip
    assert "".join(texts) == "echo: what is the capital of France"
    chats = [r for r in up.requests if r.path == "/v1/chat/completions"]
    assert len(chats) == 1 and chats[0].json["stream"] is True
    assert json.loads(lines.value("transcript event: "))["transcript"]
