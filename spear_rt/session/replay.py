"""The replay buffer: every server event a session emitted, kept for a client that resumes.

Sans-I/O. Events are stored encoded (the same bytes object the outbound queue sends, so an
event waiting for the socket costs nothing extra), bounded in bytes: past `max_bytes` the
oldest are evicted. `since(N)` answers a resume: the events with seq > N, or None when some
of them have been evicted (that resume cannot be lossless and is refused).

Seqs and bytes sit in two parallel deques rather than one of (seq, bytes) tuples: ints and
bytes are not tracked by the garbage collector, tuples are: hundreds of sessions' buffers
would add a few hundred thousand objects to every full collection.
"""

from __future__ import annotations

from collections import deque


class ReplayBuffer:
    """Encoded server events by seq, oldest first, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._seqs: deque[int] = deque()
        self._data: deque[bytes] = deque()
        self.nbytes = 0
        self.evicted_through = 0  # highest seq no longer held (0: nothing evicted)

    def __len__(self) -> int:
        return len(self._seqs)

    def append(self, seq: int, data: bytes) -> None:
        """Keep event `seq`; evicts the oldest while over the bound (never the newest)."""
        seqs, datas = self._seqs, self._data
        seqs.append(seq)
        datas.append(data)
        self.nbytes += len(data)
        while self.nbytes > self.max_bytes and len(seqs) > 1:
            self.nbytes -= len(datas.popleft())
            self.evicted_through = seqs.popleft()

    def since(self, last_seq: int) -> list[bytes] | None:
        """Events with seq > `last_seq`, oldest first; None if some were evicted."""
        if last_seq < self.evicted_through:
            return None
        newer = 0
        for seq in reversed(self._seqs):
            if seq <= last_seq:
                break
            newer += 1
        return list(self._data)[len(self._data) - newer :] if newer else []
