"""Server -> client event queue, bounded in bytes (sans-I/O).

Overflow policy, in order, when the encoded bytes waiting exceed `max_bytes`:

1. coalesce: consecutive transcript deltas of the same item merge into one delta;
2. drop: the oldest remaining delta is dropped and counted;
3. never dropped: completed, failed, error and lifecycle events. If those alone exceed
   `hard_limit_bytes` the client is not reading at all; `overflowed` turns true and the
   session closes it (policy violation) instead of growing without bound.

Events are encoded once, when pushed; the writer sends the bytes as they are.
"""

from __future__ import annotations

from collections import deque

from spear_rt.protocol.server_events import ServerEvent, TranscriptionDelta, encode_server_event


class _Entry:
    __slots__ = ("data", "event")

    def __init__(self, event: ServerEvent, data: bytes) -> None:
        self.event = event
        self.data = data


class OutboundQueue:
    """Encoded server events awaiting the client socket."""

    def __init__(self, max_bytes: int, hard_limit_factor: int = 4) -> None:
        self.max_bytes = max_bytes
        self.hard_limit_bytes = max_bytes * hard_limit_factor
        self._entries: deque[_Entry] = deque()
        self.nbytes = 0
        self.coalesced = 0
        self.dropped = 0
        self.overflowed = False

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, event: ServerEvent, data: bytes | None = None) -> bytes:
        """Queue one stamped event (`data`: its encoding, if done already); returns the bytes."""
        if data is None:
            data = encode_server_event(event)
        self._entries.append(_Entry(event, data))
        self.nbytes += len(data)
        if self.nbytes > self.max_bytes:
            self._shrink()
        return data

    def take_all(self) -> list[bytes]:
        """Everything queued, oldest first; the queue is empty afterwards."""
        out = [e.data for e in self._entries]
        self._entries.clear()
        self.nbytes = 0
        return out

    def _shrink(self) -> None:
        self._coalesce()
        entries = self._entries
        while self.nbytes > self.max_bytes:
            victim = next((e for e in entries if isinstance(e.event, TranscriptionDelta)), None)
            if victim is None:
                break
            entries.remove(victim)
            self.nbytes -= len(victim.data)
            self.dropped += 1
        if self.nbytes > self.hard_limit_bytes:
            self.overflowed = True

    def _coalesce(self) -> None:
        merged: deque[_Entry] = deque()
        for entry in self._entries:
            prev = merged[-1] if merged else None
            ev = entry.event
            if (
                prev is not None
                and isinstance(ev, TranscriptionDelta)
                and isinstance(prev.event, TranscriptionDelta)
                and prev.event.item_id == ev.item_id
                and prev.event.content_index == ev.content_index
            ):
                # The merged delta keeps the later seq: a resuming client never sees it twice.
                combined = TranscriptionDelta(
                    event_id=ev.event_id,
                    seq=ev.seq,
                    item_id=ev.item_id,
                    content_index=ev.content_index,
                    delta=prev.event.delta + ev.delta,
                )
                self.nbytes -= len(prev.data) + len(entry.data)
                prev.event = combined
                prev.data = encode_server_event(combined)
                self.nbytes += len(prev.data)
                self.coalesced += 1
            else:
                merged.append(entry)
        self._entries = merged
