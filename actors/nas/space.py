"""The search space of a super-network: its elastic variables and their choices.

A sub-network is one value per elastic variable, as a dict `{"depth": 2, "width_1": 32, ...}`.
Some variables only matter when another one is large enough (the width of layer 3 of a
depth-2 network does not exist); `gates` declares that, and `canonical` sets such inactive
variables to their first choice, so that two configs describing the same sub-network get the
same `key`. Every strategy and the results table identify sub-networks by that key: it is how
no sub-network is validated twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

Config = dict[str, int]
Key = tuple[int, ...]


@dataclass(frozen=True)
class SearchSpace:
    """Ordered elastic variables -> their allowed values (ascending)."""

    choices: Mapping[str, tuple[int, ...]]
    # variable -> (gating variable, minimum value at which the variable is active)
    gates: Mapping[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.choices)

    def canonical(self, config: Mapping[str, int]) -> Config:
        out = {name: int(config[name]) for name in self.choices}
        for name, (gate, minimum) in self.gates.items():
            if out[gate] < minimum:
                out[name] = self.choices[name][0]
        return out

    def key(self, config: Mapping[str, int]) -> Key:
        canonical = self.canonical(config)
        return tuple(canonical[name] for name in self.choices)

    def from_key(self, key: Key) -> Config:
        return dict(zip(self.choices, (int(v) for v in key), strict=True))

    def largest(self) -> Config:
        return self.canonical({n: max(c) for n, c in self.choices.items()})

    def smallest(self) -> Config:
        return self.canonical({n: min(c) for n, c in self.choices.items()})

    def sample(self, rng: np.random.Generator) -> Config:
        """A sub-network drawn uniformly from the distinct ones: the gating variables' values
        are weighted by how many sub-networks each leaves, so a depth-1 network is not drawn
        as often as all depth-4 ones together."""
        gating = sorted({gate for gate, _ in self.gates.values()}, key=self.names.index)
        combos = list(itertools.product(*(self.choices[g] for g in gating)))
        weights = np.array([self._completions(dict(zip(gating, c, strict=True))) for c in combos])
        picked = combos[rng.choice(len(combos), p=weights / weights.sum())]
        config = dict(zip(gating, picked, strict=True))
        for name, values in self.choices.items():
            if name not in config:
                config[name] = int(rng.choice(values))
        return self.canonical(config)

    def _completions(self, gating: Mapping[str, int]) -> int:
        """How many distinct sub-networks share these values of the gating variables."""
        count = 1
        for name, values in self.choices.items():
            if name in gating:
                continue
            gate = self.gates.get(name)
            if gate is None or gating[gate[0]] >= gate[1]:
                count *= len(values)
        return count

    def enumerate(self) -> Iterator[Config]:
        """Every distinct sub-network once, in a fixed order."""
        seen: set[Key] = set()
        for values in itertools.product(*self.choices.values()):
            config = self.canonical(dict(zip(self.choices, values, strict=True)))
            key = self.key(config)
            if key not in seen:
                seen.add(key)
                yield config

    @property
    def size(self) -> int:
        return sum(1 for _ in self.enumerate())

    # Encodings ---------------------------------------------------------------------------

    def upper_bounds(self) -> np.ndarray:
        """Largest choice index of each variable (the integer genome of NSGA-II)."""
        return np.array([len(c) - 1 for c in self.choices.values()])

    def decode(self, indices: np.ndarray) -> Config:
        """Choice indices (one per variable) -> canonical config."""
        return self.canonical(
            {n: c[int(i)] for (n, c), i in zip(self.choices.items(), indices, strict=True)}
        )

    def one_hot(self, configs: list[Config]) -> np.ndarray:
        """(n, sum of choice counts) one-hot features, as predictors use them (PAPERS.md §3)."""
        columns = []
        for name, values in self.choices.items():
            picked = np.array([values.index(self.canonical(c)[name]) for c in configs])
            columns.append(np.eye(len(values))[picked])
        return np.concatenate(columns, axis=1)

    def restrict(self, subsets: Mapping[str, list[int]]) -> SearchSpace:
        """The same space with some variables limited to a subset of their choices. Callers
        check the subsets first (known variable, non-empty, allowed values)."""
        choices = {
            n: tuple(sorted(set(subsets[n]))) if n in subsets else c
            for n, c in self.choices.items()
        }
        return SearchSpace(choices, dict(self.gates))
