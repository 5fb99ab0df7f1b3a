"""A self-signed certificate for 127.0.0.1 and localhost, made at test time with `openssl`.

The same command as the README's TLS section (EC P-256, one day). Tests that need it skip
when the `openssl` program is missing (it is on Debian and in python images).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

OPENSSL_REQ = [
    "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
    "-nodes", "-days", "1", "-subj", "/CN=localhost",
    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
]  # fmt: skip


def make_cert(directory: Path) -> tuple[Path, Path]:
    """Write cert.pem and key.pem into `directory`; returns their paths."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl program is not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [*OPENSSL_REQ, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key
