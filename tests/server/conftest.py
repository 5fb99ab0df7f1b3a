"""Fixtures shared by the server tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.node_sdk import NODE_DIR, install_node_sdk


@pytest.fixture(scope="module")
def node_sdk() -> Path:
    """tests/node with the pinned openai + ws packages installed (`npm ci`, once)."""
    missing = install_node_sdk()
    if missing is not None:
        pytest.skip(missing)
    return NODE_DIR
