"""The official openai Node SDK for tests: tests/node pins openai + ws (package-lock.json).

`npm ci --prefix tests/node` installs it into tests/node/node_modules (gitignored); the tests
run it once themselves when it is missing, so CI needs only node and npm with registry access.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE_MODULES = NODE_DIR / "node_modules"


def install_node_sdk() -> str | None:
    """Make sure the SDK is installed; None when it is, else why it cannot be (no node/npm).

    A failing `npm ci` raises AssertionError with its output: that is a broken setup, not a
    reason to skip.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "node and npm are not installed"
    if (NODE_MODULES / "openai" / "package.json").exists():
        return None
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"npm ci --prefix tests/node failed: {done.stderr[-2000:]}"
    return None
