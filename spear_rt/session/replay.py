"""The replay buffer: every server event a session emitted, kept for a client that resumes.

Sans-I/O. Events are stored encoded (the same bytes object the outbound queue sends, so an
event waiting for the socket costs nothing extra), bounded in bytes: past `max_bytes` the
oldest are evicted. `since(N)` answers a resume: the events with seq > N, or None when some
of them have been evicted (that resume cannot be lossless and is refused).
"""

from __future__ import annotations

from collections import deque


class ReplayBuffer:
    """Encoded server events by seq, oldest first, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: deque[tuple[int, bytes]] = deque()
        self.nbytes = 0
        self.evicted_through = 0  # highest seq no longer held (0: nothing evicted)

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, seq: int, data: bytes) -> None:
        """Keep event `seq`; evicts the oldest while over the bound (never the newest)."""
        entries = self._entries
        entries.append((seq, data))
        self.nbytes += len(data)
        while self.nbytes > self.max_bytes and len(entries) > 1:
            old_seq, old = entries.popleft()
            self.nbytes -= len(old)
            self.evicted_through = old_seq

    def since(self, last_seq: int) -> list[bytes] | None:
        """Events with seq > `last_seq`, oldest first; None if some were evicted."""
        if last_seq < self.evicted_through:
            return None
        newer: list[bytes] = []
        for seq, data in reversed(self._entries):
            if seq <= last_seq:
                break
            newer.append(data)
        newer.reverse()
        return newer
