"""TLS on the one port (`[server] tls_cert` / `tls_key`): https:// and wss:// on every driver.

The clients are the real ones: the official `openai` package (GA `client.realtime.connect`, and
beta `client.beta.realtime.connect`, which always builds wss://), httpx for one-shot requests,
and the official Node SDK (`OpenAIRealtimeWS` from `openai/realtime/ws`, wss:// only), each
trusting a self-signed certificate made for the test. The server runs on its own loop (trio,
asyncio tasks, asyncio callbacks, uvloop callbacks) in a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import pytest
from anyio.streams.tls import TLSStream

from spear_rt.config import Config
from spear_rt.errors import ConfigError
from spear_rt.server.app import Server
from spear_rt.server.tls import server_ssl_context
from tests.conftest import WsClient, b64, make_config, noise_pcm, running_server, serve_in_thread
from tests.selfsigned import make_cert
from tests.server.test_realtime import BETA, MANUAL_BETA, TRANSCRIPTION
from tests.server.test_slow_client import (
    MAX_OUTBOUND,
    NORMAL_APPENDS,
    WORDY_DELTA,
    wordy_registry,
)

openai = pytest.importorskip("openai")

DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
TIMEOUT_S = 15

# id: (anyio backend, backend options, [server] driver)
DRIVERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "trio": ("trio", {}, "auto"),
    "asyncio-callbacks": ("asyncio", {}, "auto"),
    "asyncio-tasks": ("asyncio", {}, "anyio"),
    "uvloop-callbacks": ("asyncio", {"use_uvloop": True}, "auto"),
}


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed cert.pem / key.pem for 127.0.0.1 and localhost."""
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def client_ssl(cert: tuple[Path, Path]) -> ssl.SSLContext:
    """A client context that trusts the test certificate (and verifies the host name)."""
    return ssl.create_default_context(cafile=str(cert[0]))


@asynccontextmanager
async def _port(config: Config) -> AsyncIterator[int]:
    async with running_server(config) as server:
        yield server.port or 0


def serving(driver: str, server_toml: str) -> contextlib.AbstractContextManager[int]:
    """A server with the stub backend on `driver`'s loop in a thread; yields its port."""
    backend, options, _ = DRIVERS[driver]
    config = make_config(server=server_toml)
    return serve_in_thread(
        lambda: _port(config), TIMEOUT_S, backend=backend, backend_options=options
    )


def tls_toml(driver: str, cert: tuple[Path, Path]) -> str:
    return f'driver = "{DRIVERS[driver][2]}"\ntls_cert = "{cert[0]}"\ntls_key = "{cert[1]}"'


@pytest.fixture(params=list(DRIVERS))
def tls_port(request: pytest.FixtureRequest, cert: tuple[Path, Path]) -> Iterator[int]:
    """A TLS server with the stub backend on the driver of the param, in a thread; its port."""
    with serving(request.param, tls_toml(request.param, cert)) as port:
        yield port


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_a_client_that_never_finishes_the_handshake_is_closed(
    driver: str, cert: tuple[Path, Path]
) -> None:
    """The TLS handshake is bounded by [server] handshake_timeout_s (no slowloris)."""
    with serving(driver, tls_toml(driver, cert) + "\nhandshake_timeout_s = 0.3") as port:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as idle:
            assert read_to_end(idle) == b""  # closed by the server, long before TIMEOUT_S


async def transcribe(conn: Any, session: dict[str, Any], samples: int) -> list[Any]:
    """One manual turn of noise through an SDK connection; the events up to `completed`."""
    created = await conn.recv()
    assert created.type.endswith("session.created"), created
    await conn.send({"type": created.type.replace("created", "update"), "session": session})
    updated = await conn.recv()
    assert updated.type.endswith("session.updated"), updated
    await conn.input_audio_buffer.append(audio=b64(noise_pcm(samples)))
    await conn.input_audio_buffer.commit()
    events = []
    async for event in conn:
        assert event.type != "error", event
        events.append(event)
        if event.type == COMPLETED:
            return events
    raise AssertionError("the connection closed before the transcript was completed")


def check_transcript(events: list[Any], words: int) -> None:
    deltas = "".join(e.delta for e in events if e.type == DELTA)
    assert events[-1].type == COMPLETED
    assert deltas == events[-1].transcript and len(deltas.split()) == words


def test_ga_sdk_realtime_over_wss(tls_port: int, client_ssl: ssl.SSLContext) -> None:
    """GA `client.realtime.connect` on an https:// base_url goes to wss:// and transcribes."""

    async def main() -> list[Any]:
        client = openai.AsyncOpenAI(
            api_key="sk-anything", base_url=f"https://127.0.0.1:{tls_port}/v1", max_retries=0
        )
        async with asyncio.timeout(TIMEOUT_S):
            async with client.realtime.connect(
                extra_query={"intent": "transcription"},
                websocket_connection_options={"ssl": client_ssl},  # type: ignore[typeddict-unknown-key]
            ) as conn:
                manual = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}
                return await transcribe(conn, manual, 24000)

    check_transcript(asyncio.run(main()), 5)  # 1 s of noise: five stub words


def test_beta_sdk_realtime_over_wss_without_websocket_base_url(
    tls_port: int, client_ssl: ssl.SSLContext
) -> None:
    """Beta `client.beta.realtime.connect` (always wss://, no websocket_base_url) transcribes."""

    async def main() -> list[Any]:
        client = openai.AsyncOpenAI(
            api_key="sk-anything", base_url=f"https://localhost:{tls_port}/v1", max_retries=0
        )
        async with asyncio.timeout(TIMEOUT_S):
            async with client.beta.realtime.connect(
                model="gpt-4o-transcribe",
                extra_query={"intent": "transcription"},
                websocket_connection_options={"ssl": client_ssl},  # type: ignore[typeddict-unknown-key]
            ) as conn:
                return await transcribe(conn, {"turn_detection": None}, 12000)

    check_transcript(asyncio.run(main()), 2)


def test_https_one_shot_requests_with_keep_alive(tls_port: int, client_ssl: ssl.SSLContext) -> None:
    """httpx over https://: a GET and a POST with a body on one kept-alive TLS connection."""
    with httpx.Client(base_url=f"https://127.0.0.1:{tls_port}", verify=client_ssl) as http:
        health = http.get("/healthz", timeout=TIMEOUT_S)
        body = {"model": "stub", "input": "hello over tls " * 200}
        answer = http.post("/v1/embeddings", json=body, timeout=TIMEOUT_S)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"][0]["embedding"]
    assert answer.headers["x-spear-instance"] == "stub"


def test_plain_text_and_bad_records_on_the_tls_port_are_dropped_quietly(
    tls_port: int, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """Plain HTTP, a client that distrusts the cert, and a forged record after the handshake:
    each connection is closed (no answer, no traceback) and the server goes on serving."""
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", tls_port), timeout=TIMEOUT_S) as plain:
        plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"200 OK" not in read_to_end(plain)
    with pytest.raises(ssl.SSLCertVerificationError):  # the system store lacks our test CA
        with socket.create_connection(("127.0.0.1", tls_port), timeout=TIMEOUT_S) as sock:
            ssl.create_default_context().wrap_socket(sock, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", tls_port), timeout=TIMEOUT_S) as raw:
        handshake(raw, client_ssl)
        raw.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))  # application data no key made
        read_to_end(raw)
    with httpx.Client(verify=client_ssl) as http:
        assert http.get(f"https://127.0.0.1:{tls_port}/healthz", timeout=TIMEOUT_S).is_success
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if r.exc_info]


def read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return b"".join(chunks)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def handshake(sock: socket.socket, context: ssl.SSLContext) -> None:
    """A client TLS handshake over `sock` through memory BIOs (the socket stays raw)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)
    sock.sendall(outgoing.read())


# --- the Node SDK -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tls_port", ["trio", "asyncio-callbacks", "uvloop-callbacks"], indirect=True
)
def test_node_sdk_realtime_over_wss(tls_port: int, cert: tuple[Path, Path], node_sdk: Path) -> None:
    """`OpenAIRealtimeWS` (wss:// only) with NODE_EXTRA_CA_CERTS: a transcribed manual turn."""
    done = subprocess.run(
        ["node", str(node_sdk / "realtime_transcribe.mjs"), f"https://127.0.0.1:{tls_port}/v1"],
        env={**os.environ, "NODE_EXTRA_CA_CERTS": str(cert[0])},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["url"] == f"wss://127.0.0.1:{tls_port}/v1/realtime?model=any"
    assert result["deltas"] == result["transcript"] and len(result["transcript"].split()) == 5


# --- bad settings -------------------------------------------------------------------------------


def bad_settings(tmp: Path, cert: tuple[Path, Path]) -> dict[str, tuple[str, str | None, str]]:
    """Each case: (tls_cert, tls_key, the start of the expected one-line error)."""
    other_key = tmp / "other" / "key.pem"
    other_key.parent.mkdir()
    make_cert(other_key.parent)
    encrypted = tmp / "encrypted.pem"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n")
    return {
        "missing cert": (str(tmp / "nope.pem"), str(cert[1]), "server.tls_cert: cannot read"),
        "missing key": (str(cert[0]), str(tmp / "nope.pem"), "server.tls_key: cannot read"),
        "key as cert": (str(cert[1]), str(cert[1]), "server.tls_cert: "),
        "cert as key": (str(cert[0]), str(cert[0]), "server.tls_key: "),
        "mismatch": (str(cert[0]), str(other_key), "server.tls_cert: the key does not match"),
        "encrypted": (str(cert[0]), str(encrypted), "server.tls_key: "),
        "cert without key": (str(cert[0]), None, "server.tls_cert: "),
    }


def test_bad_tls_files_are_one_line_config_errors(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    for name, (tls_cert, tls_key, expected) in bad_settings(tmp_path, cert).items():
        config = make_config()
        config.server.tls_cert, config.server.tls_key = tls_cert, tls_key
        with pytest.raises(ConfigError) as caught:
            server_ssl_context(config.server)
        assert str(caught.value).startswith(expected), (name, str(caught.value))
        assert "\n" not in str(caught.value)
    config = make_config()
    config.server.tls_key = str(cert[1])
    with pytest.raises(ConfigError, match=r"^server\.tls_key: set tls_cert too"):
        server_ssl_context(config.server)
    combined = tmp_path / "combined.pem"
    combined.write_bytes(cert[0].read_bytes() + cert[1].read_bytes())
    config.server.tls_cert, config.server.tls_key = str(combined), None
    assert server_ssl_context(config.server) is not None  # one file holding both


def test_serve_with_a_bad_cert_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    toml = tmp_path / "tls.toml"
    toml.write_text(
        '[server]\nlisten = "127.0.0.1:0"\ntls_cert = "missing.pem"\n'
        '[[backends]]\nname = "stub"\nkind = "stub"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "spear_rt.cli", "serve", "--config", str(toml), "--loop", "trio"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    line = "spear-rt: config error: server.tls_cert: cannot read missing.pem: No such file"
    assert done.stderr.strip().splitlines() == [f"{line} or directory"]


# --- flow control through TLS -------------------------------------------------------------------


class ClientTLS(anyio.abc.ByteStream):
    """A client TLS stream for `WsClient` (whose half-close becomes a close under TLS)."""

    def __init__(self, tls: TLSStream) -> None:
        self.tls = tls

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.tls.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.tls.send(item)

    async def send_eof(self) -> None:
        await self.tls.aclose()

    async def aclose(self) -> None:
        await self.tls.aclose()


async def tls_ws(port: int, context: ssl.SSLContext, *, rcvbuf: int | None = None) -> WsClient:
    """A beta transcription session over wss:// (optionally with a tiny receive window)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        sock.connect(("127.0.0.1", port))
    await anyio.wait_writable(sock)  # type: ignore[attr-defined]
    raw = await anyio.abc.SocketStream.from_socket(sock)
    tls = await TLSStream.wrap(raw, hostname="127.0.0.1", ssl_context=context)
    client = await WsClient.over(ClientTLS(tls), port, TRANSCRIPTION, headers=BETA)  # type: ignore[arg-type]
    await client.recv()
    await client.send(MANUAL_BETA)
    await client.recv()
    return client


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_a_tls_client_that_stops_reading_is_bounded(
    driver: str, cert: tuple[Path, Path], client_ssl: ssl.SSLContext
) -> None:
    """Through the SSL transports too, a client that does not read meets the outbound bound
    (the callback drivers see pause_writing from asyncio's and uvloop's SSL protocol), and a
    client beside it gets every event of its turn."""
    backend, options, server_driver = DRIVERS[driver]
    server_toml = f'driver = "{server_driver}"\ntls_cert = "{cert[0]}"\ntls_key = "{cert[1]}"'

    async def main() -> dict[str, Any]:
        config = make_config(
            server=server_toml,
            realtime=f"max_outbound_bytes = {MAX_OUTBOUND}",
            backends='[[backends]]\nname = "wordy"\nkind = "wordy"\n',
        )
        server = Server(config, wordy_registry(config))
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve)
            with anyio.fail_after(30):
                slow = await tls_ws(port, client_ssl, rcvbuf=4096)
                (machine,) = (r.machine for r in server.sessions.sessions.values())
                peak, audio = 0, b64(noise_pcm(480))
                for _ in range(300):
                    await slow.send({"type": "input_audio_buffer.append", "audio": audio})
                    await anyio.lowlevel.checkpoint()
                    peak = max(peak, machine.outbound.nbytes)
                    if machine.close is not None:
                        break
                other = await tls_ws(port, client_ssl)
                for i in range(NORMAL_APPENDS):  # a burst of its deltas fits the bound
                    pcm = noise_pcm(4800, seed=100 + i)
                    await other.send({"type": "input_audio_buffer.append", "audio": b64(pcm)})
                await other.send({"type": "input_audio_buffer.commit"})
                events = await other.recv_until(COMPLETED)
            tg.cancel_scope.cancel()
        return {"peak": peak, "dropped": machine.outbound.dropped, "events": events}

    result = anyio.run(main, backend=backend, backend_options=options)
    assert result["dropped"] > 0  # the client did stop reading, through TLS
    assert result["peak"] <= 4 * MAX_OUTBOUND + 17_000  # hard limit + one event
    deltas = [e["delta"] for e in result["events"] if e["type"] == DELTA]
    assert deltas == [WORDY_DELTA] * NORMAL_APPENDS and result["events"][-1]["transcript"] == "done"
