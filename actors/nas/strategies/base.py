"""The ask/tell interface every search strategy implements.

    candidates = strategy.ask()        # sub-networks it wants validated now ([] = waiting)
    strategy.tell(key, objectives)     # the answer for one key (None = the validation failed)

The driver (`actors.nas.search`) owns the loop, the budget and de-duplication; a strategy
only proposes and learns. One `tell(key, ...)` answers every outstanding ask of that key.

`BatchStrategy` is for strategies that decide on whole batches (a generation, a predictor
refit): it hands out a batch, waits for every answer and then advances with the answers in
the order it asked — so the order in which asynchronous evaluators finish never changes what
it does next, and a seed fixes the search.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from actors.nas.space import Config, Key, SearchSpace

# Objective values a failed validation is told as: worse than anything real.
FAILED = 1e30


class Strategy:
    def __init__(self, space: SearchSpace, objectives: Sequence[str], seed: int = 0):
        self.space = space
        self.objectives = list(objectives)
        self.seed = seed

    def ask(self) -> list[Config]:
        raise NotImplementedError

    def tell(self, key: Key, objectives: np.ndarray | None) -> None:
        raise NotImplementedError


class BatchStrategy(Strategy):
    def __init__(self, space: SearchSpace, objectives: Sequence[str], seed: int = 0):
        super().__init__(space, objectives, seed)
        self._batch: list[Config] = []
        self._answers: dict[Key, np.ndarray | None] = {}
        self.rng = np.random.default_rng(seed)

    def ask(self) -> list[Config]:
        if self._batch:
            return []  # still waiting for answers
        self._batch = [self.space.canonical(c) for c in self._propose()]
        self._answers = {}
        return list(self._batch)

    def tell(self, key: Key, objectives: np.ndarray | None) -> None:
        if not self._batch:
            return
        self._answers[key] = objectives
        keys = [self.space.key(c) for c in self._batch]
        if all(k in self._answers for k in keys):
            batch, self._batch = self._batch, []
            values = np.array(
                [
                    self._answers[k]
                    if self._answers[k] is not None
                    else np.full(len(self.objectives), FAILED)
                    for k in keys
                ],
                dtype=float,
            )
            self._advance(batch, values)

    def _propose(self) -> list[Config]:
        raise NotImplementedError

    def _advance(self, batch: list[Config], values: np.ndarray) -> None:
        raise NotImplementedError
