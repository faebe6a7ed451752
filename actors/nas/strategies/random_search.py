"""Random search: distinct sub-networks drawn uniformly, independent of any result."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from actors.nas.space import Config, Key, SearchSpace
from actors.nas.strategies.base import Strategy


class RandomSearch(Strategy):
    def __init__(
        self, space: SearchSpace, objectives: Sequence[str], seed: int = 0, chunk: int = 16
    ):
        super().__init__(space, objectives, seed)
        self.rng = np.random.default_rng(seed)
        self.chunk = chunk
        self._drawn: set[Key] = set()
        self._remaining = space.size

    def ask(self) -> list[Config]:
        out = []
        while len(out) < self.chunk and self._remaining:
            config = self.space.sample(self.rng)
            key = self.space.key(config)
            if key not in self._drawn:
                self._drawn.add(key)
                self._remaining -= 1
                out.append(config)
        return out

    def tell(self, key: Key, objectives: np.ndarray | None) -> None:
        """Random search learns nothing."""
