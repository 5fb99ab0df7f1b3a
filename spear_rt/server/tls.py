"""TLS on the server's one port: `https://` and `wss://` when `[server] tls_cert` is set.

The certificate and key are PEM files, loaded once at start (`server_ssl_context`); anything
wrong with them is a `ConfigError` naming the key, so `spear-rt serve` prints one line and exits
2. On the asyncio callback driver the event loop does TLS (`create_server(ssl=...)`); on the
task driver (trio, or `driver = "anyio"`) each accepted stream is wrapped by `accept_tls`.
A failed or slow handshake (a plain-HTTP client, a client that does not trust the certificate,
one that sends nothing for `handshake_timeout_s`) closes the connection: it is the client's
error, so it is one INFO line on the task driver and asyncio's debug log on the callback driver.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

from spear_rt.config import ServerConfig
from spear_rt.errors import ConfigError

log = logging.getLogger(__name__)


def server_ssl_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The server's SSLContext, or None without `tls_cert`; ConfigError if it cannot load."""
    if server.tls_cert is None:
        if server.tls_key is not None:
            raise ConfigError("server.tls_key", "set tls_cert too (the certificate chain, PEM)")
        return None
    cert_path = str(Path(server.tls_cert).expanduser())
    key_path = str(Path(server.tls_key).expanduser()) if server.tls_key else cert_path
    key_name = "server.tls_key" if server.tls_key else "server.tls_cert"
    cert = _read_pem("server.tls_cert", cert_path)
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise ConfigError("server.tls_cert", f"{cert_path} holds no PEM certificate")
    key = _read_pem(key_name, key_path)
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(key_name, f"{key_path} holds no PEM private key")
    if b"ENCRYPTED" in key:
        raise ConfigError(key_name, f"{key_path} is encrypted: give an unencrypted key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # TLS >= 1.2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except ssl.SSLError as exc:
        why = (
            "the key does not match the certificate"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else (f"not a usable certificate and key ({exc.reason or 'PEM lib'})")
        )
        raise ConfigError("server.tls_cert", why) from None
    return context


def _read_pem(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


def _no_password() -> NoReturn:
    # without a callback OpenSSL would prompt on the terminal and the server would hang
    raise ConfigError("server.tls_key", "the key is encrypted: give an unencrypted key")


async def accept_tls(
    stream: anyio.abc.ByteStream, context: ssl.SSLContext, timeout_s: float
) -> anyio.abc.ByteStream | None:
    """The server side of the TLS handshake on `stream`; None (stream closed) if it failed."""
    failure = "timed out"
    with anyio.move_on_after(timeout_s):
        try:
            tls = await TLSStream.wrap(
                stream, server_side=True, ssl_context=context, standard_compatible=False
            )
            return ServerTLSStream(tls)
        except ssl.SSLError as exc:
            failure = exc.reason or exc.__class__.__name__
        except (anyio.BrokenResourceError, anyio.EndOfStream, OSError):
            failure = "connection lost"
    log.info("TLS handshake failed from %s: %s", _peer(stream), failure)
    await anyio.aclose_forcefully(stream)
    return None


def _peer(stream: anyio.abc.ByteStream) -> str:
    try:
        return str(stream.extra(anyio.abc.SocketAttribute.remote_address)[0])
    except (anyio.TypedAttributeLookupError, IndexError, TypeError):
        return "?"


class ServerTLSStream(anyio.abc.ByteStream):
    """anyio's TLSStream, except that a TLS protocol error is a broken stream.

    TLSStream lets `ssl.SSLError` through from `receive`/`send` (a client sending a bad record
    after the handshake); every reader of our streams handles `BrokenResourceError` instead.
    """

    def __init__(self, tls: TLSStream) -> None:
        self.tls = tls

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Decrypted bytes; EndOfStream at the end, BrokenResourceError on a TLS error."""
        try:
            return await self.tls.receive(max_bytes)
        except ssl.SSLError as exc:
            raise anyio.BrokenResourceError(exc.reason or "TLS error") from None

    async def send(self, item: bytes) -> None:
        """Encrypt and send."""
        try:
            await self.tls.send(item)
        except ssl.SSLError as exc:
            raise anyio.BrokenResourceError(exc.reason or "TLS error") from None

    async def send_eof(self) -> None:
        """Not available under TLS before 1.3 in anyio: close instead."""
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (no closing handshake: `standard_compatible=False`)."""
        await self.tls.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.tls.extra_attributes
