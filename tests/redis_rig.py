"""A free loopback port and waiting for a redis-server to answer (cluster and README tests)."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_redis(port: int, process: subprocess.Popen[Any], timeout_s: float = 10) -> None:
    """Until the redis-server on 127.0.0.1:`port` answers PING (fails if it exits or is late)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        assert process.poll() is None, "redis-server exited"
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
