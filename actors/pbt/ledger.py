"""Which checkpoints may still be needed, so that none is deleted before a copy.

A checkpoint is needed while it is some member's latest (a restart or a resume loads it;
after an exploit the recipient's latest *is* its donor's checkpoint), or while a copy
from it is in flight (`pin`). `release` returns the checkpoints that nothing needs any
more; the controller deletes them only after the search state that stops naming them
has been committed.
"""

from __future__ import annotations

from collections import Counter


class CheckpointLedger:
    def __init__(self, latest: dict[int, str] | None = None):
        self.latest: dict[int, str] = dict(latest or {})
        self.pins: Counter[str] = Counter()
        self._dropped: set[str] = set()

    def set_latest(self, member: int, path: str) -> None:
        old = self.latest.get(member)
        self.latest[member] = path
        if old is not None and old != path:
            self._dropped.add(old)

    def pin(self, path: str) -> None:
        self.pins[path] += 1

    def unpin(self, path: str) -> None:
        self.pins[path] -= 1
        if self.pins[path] <= 0:
            del self.pins[path]
            self._dropped.add(path)

    def needed(self) -> set[str]:
        return set(self.latest.values()) | set(self.pins)

    def release(self, keep: set[str] = frozenset()) -> list[str]:
        """Checkpoints superseded since the last call that nothing needs; `keep` protects
        more (e.g. the winner's final checkpoint)."""
        needed = self.needed() | set(keep)
        free = sorted(p for p in self._dropped if p not in needed)
        self._dropped -= set(free)
        self._dropped &= needed  # still-needed ones come back when dropped again
        return free
