"""Which checkpoints may still be needed, so that none is deleted before a copy.

A checkpoint is needed while it is some member's latest: a restart or a resume loads it,
and after an exploit the recipient's latest *is* its donor's checkpoint (asynchronous
exploit loads it from storage when the recipient next trains). `release` returns the
checkpoints that no member names any more; the controller deletes them only after the
search state that stops naming them has been committed.
"""

from __future__ import annotations


class CheckpointLedger:
    def __init__(self, latest: dict[int, str] | None = None):
        self.latest: dict[int, str] = dict(latest or {})
        self._dropped: set[str] = set()

    def set_latest(self, member: int, path: str) -> None:
        old = self.latest.get(member)
        self.latest[member] = path
        if old is not None and old != path:
            self._dropped.add(old)

    def needed(self) -> set[str]:
        return set(self.latest.values())

    def release(self, keep: frozenset[str] = frozenset()) -> list[str]:
        """Checkpoints superseded since the last call that no member names; `keep`
        protects more."""
        needed = self.needed() | set(keep)
        free = sorted(p for p in self._dropped if p not in needed)
        # Those still named are forgotten here; they come back when dropped again.
        self._dropped.clear()
        return free
