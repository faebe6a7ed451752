"""A search space: one `Param` per hyperparameter, with its prior, bounds and how it moves.

Pure numpy, no Ray. Every random draw takes the caller's `numpy.random.Generator`, so a
population seeded once replays the same draws. Moves say what they did ("× 1.2",
"+ 0.13", "resample", "neighbour ↑"): the text goes into the lineage and MLflow.

Values are plain Python scalars (float, int, str) so that they survive JSON and YAML.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Value = float | int | str
Prior = Literal["uniform", "log_uniform", "int_uniform", "log_int_uniform", "choice"]
Perturb = Literal["factors", "noise"]


@dataclass(frozen=True)
class Param:
    """One hyperparameter. Continuous and integer priors have [low, high]; `choice` has
    `values` (ordered: explore moves to a neighbour). `perturb` is how explore changes a
    numeric value: multiply by one of `factors`, or add N(0, noise) (the paper's toy)."""

    name: str
    prior: Prior
    low: float | None = None
    high: float | None = None
    values: tuple[Value, ...] = ()
    perturb: Perturb = "factors"
    factors: tuple[float, ...] = (0.8, 1.2)
    noise: float = 0.1

    @property
    def is_log(self) -> bool:
        return self.prior in ("log_uniform", "log_int_uniform")

    @property
    def is_int(self) -> bool:
        return self.prior in ("int_uniform", "log_int_uniform")

    def sample(self, rng: np.random.Generator) -> Value:
        """A draw from the prior."""
        if self.prior == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        low, high = float(self.low), float(self.high)
        if self.is_log:
            value = math.exp(rng.uniform(math.log(low), math.log(high)))
        else:
            value = rng.uniform(low, high)
        return self.clip(value)

    def clip(self, value: float) -> Value:
        """Into [low, high], rounded for integer priors."""
        if self.prior == "choice":
            return value
        value = min(max(float(value), float(self.low)), float(self.high))
        return int(round(value)) if self.is_int else float(value)

    def perturb_value(self, value: Value, rng: np.random.Generator) -> tuple[Value, str]:
        """explore's small move from `value` -> (new value, what was done)."""
        if self.prior == "choice":
            index = self.values.index(value) if value in self.values else 0
            step = 1 if rng.random() < 0.5 else -1
            new = min(max(index + step, 0), len(self.values) - 1)
            return self.values[new], f"neighbour {'up' if step > 0 else 'down'}"
        if self.perturb == "noise":
            delta = float(rng.normal(0.0, self.noise))
            return self.clip(float(value) + delta), f"{delta:+.3g}"
        factor = float(self.factors[int(rng.integers(len(self.factors)))])
        return self.clip(float(value) * factor), f"x {factor:g}"

    def grid(self, count: int) -> list[Value]:
        """`count` evenly spaced values over the prior (log-spaced for log priors)."""
        if self.prior == "choice":
            return [self.values[i % len(self.values)] for i in range(count)]
        low, high = float(self.low), float(self.high)
        if count == 1:
            points = [math.sqrt(low * high) if self.is_log else (low + high) / 2]
        elif self.is_log:
            points = list(np.geomspace(low, high, count))
        else:
            points = list(np.linspace(low, high, count))
        return [self.clip(p) for p in points]


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...] = field(default_factory=tuple)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def __getitem__(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def sample(self, rng: np.random.Generator) -> dict[str, Value]:
        return {p.name: p.sample(rng) for p in self.params}

    def grid(self, count: int) -> list[dict[str, Value]]:
        """`count` points of the full factorial grid with about count^(1/d) values per axis,
        taken in order; with fewer points than the grid has, the first ones."""
        if not self.params:
            return [{} for _ in range(count)]
        per_axis = max(1, math.ceil(count ** (1 / len(self.params)) - 1e-9))
        axes = [p.grid(per_axis) for p in self.params]
        points: list[dict[str, Value]] = []
        for flat in range(per_axis ** len(self.params)):
            point, rest = {}, flat
            for p, values in zip(self.params, axes, strict=True):
                point[p.name] = values[rest % per_axis]
                rest //= per_axis
            points.append(point)
        return [points[i % len(points)] for i in range(count)]

    def complete(self, given: Mapping[str, Value], rng: np.random.Generator) -> dict[str, Value]:
        """`given` values (clipped) with the missing ones drawn from their priors."""
        out = {}
        for p in self.params:
            out[p.name] = p.clip(given[p.name]) if p.name in given else p.sample(rng)
        return out
