"""WebSocketConnection: reading messages and the close from the Sans-I/O protocol."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest
import trio
import trio.testing
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from spear_rt.server.ws import WebSocketConnection


class ScriptedStream(anyio.abc.ByteStream):
    """Delivers the given chunks, then never anything again (a silent peer)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.sent: list[bytes] = []

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(self, item: bytes) -> None:
        self.sent.append(item)

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def handshake() -> tuple[ServerProtocol, ClientProtocol]:
    """A server and a client protocol, both OPEN after a real handshake."""
    client = ClientProtocol(parse_uri("ws://127.0.0.1/v1/realtime"))
    client.send_request(client.connect())
    server = ServerProtocol()
    server.receive_data(b"".join(client.data_to_send()))
    request = server.events_received()[0]
    server.send_response(server.accept(request))  # type: ignore[arg-type]
    client.receive_data(b"".join(server.data_to_send()))
    client.events_received()
    return server, client


def client_frames(client: ClientProtocol, *frames: Frame) -> bytes:
    """Masked client frames as they come over the wire."""
    for frame in frames:
        client.send_frame(frame)
    return b"".join(client.data_to_send())


async def test_a_close_read_together_with_data_ends_the_next_receive_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Data and close in one read: the messages first, then None without touching the socket."""
    protocol, client = handshake()
    data = client_frames(
        client,
        Frame(Opcode.TEXT, b'{"type": "input_audio_buffer.clear"}'),
        Frame(Opcode.CLOSE, Close(1000, "bye").serialize()),
    )
    conn = WebSocketConnection(ScriptedStream([data]), protocol)
    messages = await conn.receive()
    assert messages is not None and [m.data for m in messages] == [
        b'{"type": "input_audio_buffer.clear"}'
    ]
    with trio.fail_after(1):  # virtual time: a blocking read would hang here
        assert await conn.receive() is None


@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
async def test_fragmented_messages_are_reassembled(opcode: Opcode) -> None:
    """A message in three fragments comes out whole, with its kind."""
    protocol, client = handshake()
    data = client_frames(
        client,
        Frame(opcode, b"ab", fin=False),
        Frame(Opcode.CONT, b"cd", fin=False),
        Frame(Opcode.CONT, b"ef"),
    )
    conn = WebSocketConnection(ScriptedStream([data]), protocol)
    messages = await conn.receive()
    assert messages is not None and len(messages) == 1
    assert (messages[0].data, messages[0].text) == (b"abcdef", opcode is Opcode.TEXT)
