"""The search driver: one loop that owns the budget, de-duplication and the results.

    while the budget allows: keep the pool full with the strategy's candidates
                             take the next finished validation -> record it -> tell the strategy

A candidate whose sub-network is already in the results (validated earlier in this run, or
before an interruption) is answered from the results and never validated again; so a resumed
search, given the same seed, replays the strategy over the stored results and carries on where
it stopped. The budget counts distinct sub-networks validated (failed ones included).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.nas.pareto import pareto_mask
from actors.nas.pool import Outcome
from actors.nas.space import Config, Key, SearchSpace
from actors.nas.strategies.base import Strategy

# Consecutive asks that bring nothing new before the strategy counts as converged.
MAX_STALE_ASKS = 50


@dataclass
class Validation:
    """One row of the results table."""

    index: int  # 1-based position in the table
    config: Config
    status: str  # "ok" | "failed"
    measures: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0
    actor: str = ""
    session: str = ""  # which (resumed) run of the job validated it

    def objectives(self, names: Sequence[str]) -> np.ndarray | None:
        if self.status != "ok":
            return None
        return np.array([self.measures[n] for n in names], dtype=float)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Validation:
        return cls(**data)


@dataclass
class SearchOutcome:
    rows: list[Validation]
    new: int  # validated in this call
    replayed: int  # answered from earlier results
    stopped: str  # "budget" | "exhausted" | "stop_when"


def run_search(
    strategy: Strategy,
    pool: Any,
    space: SearchSpace,
    objectives: Sequence[str],
    budget: int,
    history: Sequence[Validation] = (),
    on_validation: Callable[[Validation, list[Validation]], None] | None = None,
    stop_when: Callable[[list[Validation]], bool] | None = None,
    session: str = "",
) -> SearchOutcome:
    rows = list(history)
    by_key: dict[Key, Validation] = {space.key(r.config): r for r in rows}
    in_flight: set[Key] = set()
    pending: deque[Config] = deque()
    new = replayed = stale = 0
    stopped = "budget"

    def fill() -> None:
        """Submit until the pool is full, the budget is spoken for, or the strategy waits."""
        nonlocal replayed, stale
        while len(in_flight) < pool.capacity and len(by_key) + len(in_flight) < budget:
            if stale > MAX_STALE_ASKS:
                return  # the strategy only proposes what is known: it has converged
            if not pending:
                asked = strategy.ask()
                if not asked:
                    return  # waiting for results still in flight, or nothing left
                pending.extend(asked)
                stale += 1
            config = space.canonical(pending.popleft())
            key = space.key(config)
            if key in in_flight:
                continue  # its result will answer this ask too
            if key in by_key:
                replayed += 1
                strategy.tell(key, by_key[key].objectives(objectives))
                continue
            stale = 0
            in_flight.add(key)
            pool.submit(key, config)

    while True:
        fill()
        if stop_when is not None and stop_when(rows):
            stopped = "stop_when"  # anything still in flight is abandoned
            break
        if not in_flight:
            stopped = "budget" if len(by_key) >= budget else "exhausted"
            break
        outcome: Outcome = pool.next_done()
        in_flight.discard(outcome.key)
        row = Validation(
            index=len(rows) + 1,
            config=outcome.config,
            status="ok" if outcome.result is not None else "failed",
            measures=dict(outcome.result or {}),
            error=outcome.error,
            attempts=outcome.attempts,
            seconds=round(outcome.seconds, 6),
            actor=outcome.actor,
            session=session,
        )
        rows.append(row)
        by_key[outcome.key] = row
        new += 1
        if on_validation:
            on_validation(row, rows)
        strategy.tell(outcome.key, row.objectives(objectives))
    return SearchOutcome(rows, new, replayed, stopped)


def front(rows: Sequence[Validation], objectives: Sequence[str]) -> list[Validation]:
    """The validated sub-networks no other dominates, by the first objective ascending."""
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        return []
    values = np.array([r.objectives(objectives) for r in ok])
    keep = [r for r, m in zip(ok, pareto_mask(values), strict=True) if m]
    return sorted(keep, key=lambda r: tuple(r.objectives(objectives)))
