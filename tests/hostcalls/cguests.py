"""C guests (examples/wasm/c) compiled to wasm32-wasi with Debian's clang, lld and wasi-libc.

`.ci/run` installs the toolchain; without it these tests fail (they are not skipped): the
guests are the point of the upstream-ABI tests.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

C_GUESTS = Path(__file__).resolve().parents[2] / "examples" / "wasm" / "c"
_CACHE = Path(tempfile.gettempdir()) / "spear_rt_c_guests"
FLAGS = ["--target=wasm32-wasi", "-O2", "-Wall", "-Werror", "-Wl,--export-table"]


def build(name: str) -> Path:
    """examples/wasm/c/<name>.c as a .wasm (cached by the sources' hash)."""
    clang = shutil.which("clang")
    assert clang is not None, "clang is not installed: apt-get install clang lld wasi-libc"
    source = C_GUESTS / f"{name}.c"
    digest = hashlib.sha256(
        source.read_bytes() + (C_GUESTS / "spear.h").read_bytes() + " ".join(FLAGS).encode()
    ).hexdigest()[:16]
    out = _CACHE / f"{name}-{digest}.wasm"
    if not out.is_file():
        _CACHE.mkdir(exist_ok=True)
        partial = out.with_suffix(".part")
        done = subprocess.run(
            [clang, *FLAGS, str(source), "-o", str(partial)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"clang failed on {name}.c:\n{done.stderr}"
        partial.rename(out)
    return out
