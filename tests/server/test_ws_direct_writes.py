"""`WebSocketConnection.write_now`: on trio a plain TCP socket is written by the sender itself;
what the socket does not take goes to the writer's `flush`, first: nothing lost or reordered."""

from __future__ import annotations

import socket
import struct

import anyio
import anyio.abc

from spear_rt.server.ws import BudgetedServerProtocol, FrameBudget, WebSocketConnection
from tests.server.test_ws_fast_frames import HANDSHAKE


async def connected() -> tuple[WebSocketConnection, socket.socket]:
    """A server-side connection past its handshake and the raw client socket."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        client = socket.create_connection(("127.0.0.1", port))
        server = await listener.listeners[0].accept()  # type: ignore[attr-defined]
    proto = BudgetedServerProtocol(budget=FrameBudget(1 << 20), max_size=1 << 20)
    proto.receive_data(HANDSHAKE)
    proto.send_response(proto.accept(proto.events_received()[0]))  # type: ignore[arg-type]
    proto.data_to_send()
    return WebSocketConnection(server, proto), client


def frames(data: bytes) -> list[bytes]:
    """The payloads of the unmasked server frames in `data`."""
    out, pos = [], 0
    while pos < len(data):
        length, head = data[pos + 1] & 0x7F, 2
        if length == 126:
            length, head = struct.unpack("!H", data[pos + 2 : pos + 4])[0], 4
        elif length == 127:
            length, head = struct.unpack("!Q", data[pos + 2 : pos + 10])[0], 10
        out.append(data[pos + head : pos + head + length])
        pos += head + length
    return out


def test_on_trio_the_sender_writes_and_the_writer_sends_what_the_socket_left() -> None:
    async def main() -> tuple[bytes, list[bytes], int]:
        conn, client = await connected()
        with client:
            assert conn.can_write_now()
            conn.queue_text(b"now")
            conn.write_now()
            client.settimeout(5)
            first = client.recv(100)  # there without any await on the server's side
            sent: list[bytes] = []
            while conn.can_write_now():  # the client reads nothing: the socket fills up
                payload = b"%06d" % len(sent) + b"x" * 60_000
                conn.queue_text(payload)
                sent.append(payload)
                conn.write_now()
                assert len(sent) < 10_000, "the socket never filled"
            assert not conn.can_write_now()  # what it left waits for the writer
            received = bytearray()

            def read_all() -> None:
                client.settimeout(5)
                while len(received) < sum(len(p) + 4 for p in sent):
                    received.extend(client.recv(1 << 20))

            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, read_all)
                await conn.flush()
            writable = conn.can_write_now()
            await conn.stream.aclose()
        assert frames(bytes(received)) == sent  # all of it, in order
        return first, sent, int(writable)

    first, sent, writable = anyio.run(main, backend="trio")
    assert first == b"\x81\x03now" and len(sent) > 1 and writable == 1


def test_on_asyncio_the_writer_sends() -> None:
    """asyncio's transports buffer writes: a direct one could overtake them."""

    async def main() -> bool:
        conn, client = await connected()
        with client:
            able = conn.can_write_now()
            await conn.stream.aclose()
        return able

    assert anyio.run(main, backend="asyncio") is False


def test_on_trio_reads_wait_then_read_once_and_see_the_end() -> None:
    """The direct read (wait, then one recv): messages, then a drop seen as one."""

    async def main() -> tuple[list[bytes], bool, bool]:
        conn, client = await connected()
        with client:
            payload = b'{"type":"input_audio_buffer.commit"}'
            key = b"\x01\x02\x03\x04"
            masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            client.sendall(bytes((0x81, 0x80 | len(payload))) + key + masked)
            got = [bytes(m.data) for m in await conn.receive() or []]
        ended = await conn.receive()  # the client socket closed: no close frame
        return got, ended is None, conn.dropped

    got, ended, dropped = anyio.run(main, backend="trio")
    assert got == [b'{"type":"input_audio_buffer.commit"}'] and ended and dropped
