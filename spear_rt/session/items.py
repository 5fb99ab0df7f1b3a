"""A session's conversation items (sans-I/O): which are announced, pending, and their order.

Rules:

* an item is *announced* by the first event that names it: ``speech_started`` (server VAD) or
  ``input_audio_buffer.committed``; no event may name an item before that;
* live transcript deltas of a turn nobody announced yet (a manual-commit turn before its
  commit) are held here and released right after the commit announces the item, unless the
  session opted in to early deltas (``session.spear.early_deltas``). Held text is bounded by
  `MAX_HELD_CHARS` per turn: past it, further deltas are dropped and counted (the completed
  transcript still carries all of it);
* a committed item is *pending* until its transcript completes or fails; it remembers the
  item before it (``previous_item_id``) and its audio duration (``usage.seconds``).
"""

from __future__ import annotations

import msgspec

MAX_HELD_CHARS = 64 * 1024


class PendingItem(msgspec.Struct):
    """A committed item awaiting its transcript."""

    previous_item_id: str | None
    audio_seconds: float


class Items:
    """Announced, held and pending items of one session (module docstring)."""

    def __init__(self) -> None:
        self.pending: dict[str, PendingItem] = {}
        self.previous_item_id: str | None = None  # the last committed item
        self.dropped = 0  # held deltas dropped past MAX_HELD_CHARS
        self._announced_turn: str | None = None  # named by speech_started, not committed yet
        self._held_item: str | None = None
        self._held: list[str] = []
        self._held_chars = 0
        self._discarded: str | None = None  # the last turn cleared before its commit

    def speech_started(self, item_id: str) -> None:
        """Server VAD announced `item_id` (the turn it opened)."""
        self._announced_turn = item_id

    def committed(self, item_id: str, audio_seconds: float) -> tuple[str | None, list[str]]:
        """`item_id` is committed: (its previous item id, held deltas to send after it)."""
        previous, self.previous_item_id = self.previous_item_id, item_id
        self.pending[item_id] = PendingItem(previous, audio_seconds)
        if self._announced_turn == item_id:
            self._announced_turn = None
        held: list[str] = []
        if self._held_item == item_id:
            held = self._held
            self._release_held()
        return previous, held

    def hold(self, item_id: str, delta: str, open_turn: str | None) -> bool:
        """True if `delta` must not go out now: it belongs to the open, unannounced turn (held),
        or to a turn cleared before anything announced it (dropped)."""
        if item_id == self._discarded:
            return True  # in flight when the client cleared the turn: never announced
        if item_id != open_turn or item_id == self._announced_turn:
            return False
        if self._held_item != item_id:
            self._release_held()
            self._held_item = item_id
        if self._held_chars + len(delta) > MAX_HELD_CHARS:
            self.dropped += 1
        else:
            self._held.append(delta)
            self._held_chars += len(delta)
        return True

    def discarded(self, item_id: str | None) -> None:
        """The open turn was dropped (clear): its held deltas go with it."""
        if item_id is not None and item_id != self._announced_turn:
            self._discarded = item_id
        if item_id is not None and self._held_item == item_id:
            self._release_held()
        if self._announced_turn == item_id:
            self._announced_turn = None

    def finished(self, item_id: str) -> PendingItem | None:
        """`item_id`'s transcript is final: no longer pending (None if it was not)."""
        return self.pending.pop(item_id, None)

    def _release_held(self) -> None:
        self._held_item = None
        self._held = []
        self._held_chars = 0
