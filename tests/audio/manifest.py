"""The committed audio fixtures (fixtures/audio) and their manifest, for the audio tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "audio"
MANIFEST: list[dict[str, Any]] = json.loads((FIXTURES / "manifest.json").read_text())


def fixture_items(*kinds: str) -> list[dict[str, Any]]:
    """Manifest entries of the given kinds, in manifest order."""
    return [item for item in MANIFEST if item["kind"] in kinds]
