"""Recent input audio addressable by absolute sample index (bounded, sans-I/O).

Server VAD reports a turn's start in the past (prefix padding plus detection delay); the
session keeps the last `keep_samples` of input so it can send the turn from that point.
Older audio is discarded: the buffer never holds more than `keep_samples` plus one chunk.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from spear_rt.backend import Pcm16


class AudioHistory:
    """A bounded window over the input stream."""

    def __init__(self, keep_samples: int) -> None:
        self.keep_samples = keep_samples
        self._chunks: deque[tuple[int, Pcm16]] = deque()  # (absolute start, samples)
        self._size = 0

    def append(self, pcm: Pcm16, start: int) -> None:
        """Add a chunk that begins at absolute sample `start`."""
        self._chunks.append((start, pcm))
        self._size += pcm.size
        while self._chunks and self._size - self._chunks[0][1].size >= self.keep_samples:
            _, old = self._chunks.popleft()
            self._size -= old.size

    def slice(self, begin: int, end: int) -> Pcm16:
        """Samples [begin, end) that are still held (older ones are silently gone)."""
        parts = []
        for start, pcm in self._chunks:
            stop = start + pcm.size
            if stop <= begin or start >= end:
                continue
            parts.append(pcm[max(begin - start, 0) : min(end, stop) - start])
        if not parts:
            return np.zeros(0, dtype=np.int16)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
