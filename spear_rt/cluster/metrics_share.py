"""`/metrics` across `serve --workers N`: each worker's exposition in a shared directory.

Every worker writes its own Prometheus text to ``<dir>/worker-<i>.prom`` (atomically: a
temporary file renamed) once a second and whenever it answers ``/metrics``; the worker that
answers sums every worker's samples by name and labels (counters, histogram buckets, sums
and counts, and the gauges spear_rt exports, which are all counts or bytes) and keeps each
metric's HELP and TYPE once. The parent makes the directory (``SPEAR_RT_METRICS_DIR``) and
removes it when the workers are done. A worker that died leaves its last snapshot out once
its file is older than `STALE_S`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "SPEAR_RT_METRICS_DIR"
STALE_S = 10.0


class MetricsShare:
    """One worker's side of the shared directory."""

    def __init__(self, directory: str | Path, worker: int) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"worker-{worker}.prom"

    def publish(self, text: str) -> None:
        """Write this worker's exposition (atomic rename; a full disk only loses a snapshot)."""
        partial = self.path.with_suffix(".tmp")
        try:
            partial.write_text(text)
            os.replace(partial, self.path)
        except OSError:
            pass

    def aggregate(self, own: str) -> str:
        """Every live worker's samples summed (this worker's `own`, fresh, included)."""
        texts = [own]
        now = time.time()
        for path in sorted(self.directory.glob("worker-*.prom")):
            if path == self.path:
                continue
            try:
                if now - path.stat().st_mtime <= STALE_S:
                    texts.append(path.read_text())
            except OSError:
                continue  # a worker replacing its file right now: its next snapshot counts
        return merge(texts)


def merge(texts: list[str]) -> str:
    """Prometheus text expositions summed sample by sample, first-seen order kept."""
    meta: dict[str, list[str]] = {}
    samples: dict[str, dict[str, float]] = {}
    for text in texts:
        current = ""
        for line in text.splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                if len(parts) >= 3:
                    current = parts[2]
                    meta.setdefault(current, [])
                    samples.setdefault(current, {})
                    if len(meta[current]) < 2 and line not in meta[current]:
                        meta[current].append(line)
                continue
            key, _, value = line.rpartition(" ")
            if not key:
                continue
            try:
                number = float(value)
            except ValueError:
                continue
            family = samples.setdefault(current, {})
            family[key] = family.get(key, 0.0) + number
    out: list[str] = []
    for name, lines in meta.items():
        out.extend(lines)
        out.extend(f"{key} {_number(value)}" for key, value in samples.get(name, {}).items())
    return "\n".join(out) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)
