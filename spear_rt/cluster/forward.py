"""A resume that reached the wrong worker or node goes to the one holding its session.

The client's upgrade request is sent to the owner as it came, plus ``Spear-Forwarded:
node`` or ``worker``; from then on bytes are copied both ways unchanged, so the owner
answers the handshake, checks the client key and the resume token, and its close code
reaches the client as sent. A request already forwarded to a node may be forwarded once
more, to that node's worker; one forwarded to a worker never again (no loops). Nodes that
serve TLS forward over TLS, trusting only the certificate they share.

Memory: one read (64 KiB at most) per direction in flight; each side is read only once
the other took the previous read, so a slow reader slows its writer (TCP pushes back).
The owner closing ends both directions; the client's EOF is passed on and the owner's
answer (its close frame) still comes back.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import anyio
import anyio.abc

log = logging.getLogger(__name__)
FORWARDED_HEADER = b"spear-forwarded"
HOP_NODE = b"node"
HOP_WORKER = b"worker"
READ_SIZE = 65536
CONNECT_TIMEOUT_S = 2.0


def node_tls(cert_path: str | None) -> ssl.SSLContext | None:
    """How a node that serves TLS reaches the others: TLS, trusting the certificate the
    nodes share (their common config's `tls_cert`), whatever address it is reached at."""
    if cert_path is None:
        return None
    context = ssl.create_default_context(cafile=str(Path(cert_path).expanduser()))
    context.check_hostname = False  # pinned to our own certificate instead of a name
    context.set_alpn_protocols(["http/1.1"])
    return context


async def open_owner(
    target: str, timeout_s: float, tls: ssl.SSLContext | None = None
) -> anyio.abc.ByteStream | None:
    """A connection to `target` (``unix:PATH``, or ``HOST:PORT`` over `tls` when given), or
    None (logged)."""
    try:
        with anyio.fail_after(timeout_s):
            if target.startswith("unix:"):
                return await anyio.connect_unix(target[5:])
            host, _, port = target.rpartition(":")
            if tls is None:
                return await anyio.connect_tcp(host.strip("[]"), int(port))
            return await anyio.connect_tcp(
                host.strip("[]"), int(port), ssl_context=tls, tls_standard_compatible=False
            )
    except (OSError, TimeoutError, ValueError, ssl.SSLError) as exc:
        log.warning("cannot forward a resume to %s: %s", target, exc or type(exc).__name__)
        return None


async def splice(client: anyio.abc.ByteStream, head: bytes, owner: anyio.abc.ByteStream) -> None:
    """Send `head` to `owner`, then copy bytes both ways until the owner is done."""
    async with owner, anyio.create_task_group() as tg:
        await owner.send(head)
        tg.start_soon(_client_to_owner, client, owner, tg.cancel_scope)
        try:
            await _copy(owner, client)
        finally:
            tg.cancel_scope.cancel()  # the owner is done: nothing more to forward


async def _client_to_owner(
    client: anyio.abc.ByteStream, owner: anyio.abc.ByteStream, scope: anyio.CancelScope
) -> None:
    if not await _copy(client, owner):
        scope.cancel()  # the client is gone without a goodbye
        return
    try:
        await owner.send_eof()
    except (OSError, NotImplementedError, anyio.BrokenResourceError, anyio.ClosedResourceError):
        scope.cancel()


async def _copy(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream) -> bool:
    """Copy until `src` ends: True at its EOF, False when either side broke."""
    while True:
        try:
            data = await src.receive(READ_SIZE)
        except anyio.EndOfStream:
            return True
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        try:
            await dst.send(data)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
