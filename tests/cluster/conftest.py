"""A real redis-server on 127.0.0.1, one per test module, with nothing saved to disk."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.redis_rig import free_port, wait_for_redis


@contextmanager
def redis_server(port: int, workdir: Path) -> Iterator[str]:
    """A redis-server on 127.0.0.1:`port` until the block ends (CI installs it: no skip)."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed (make install-test installs it)"
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_redis(port, process)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """redis://127.0.0.1:PORT/0 of a fresh redis-server, one per test module."""
    with redis_server(free_port(), tmp_path_factory.mktemp("redis")) as url:
        yield url
