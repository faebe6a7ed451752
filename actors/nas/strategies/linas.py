"""LINAS (PAPERS.md §3): predictors fitted on every validated sub-network steer an inner
NSGA-II; only its final population is validated.

    validate a random population
    repeat: fit one predictor per measured objective on all validated sub-networks
            inner NSGA-II over the predictors (population x generations cheap evaluations)
            validate up to `batch` of its final front not validated before

Objectives the super-network counts exactly (params, MACs) are computed, not predicted: a
regressor on one-hot features can only lose accuracy on a product of widths. After each
batch comes back, each predictor's quality on it — sub-networks it had not seen — is recorded
as MAPE and Kendall tau (`quality`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from actors.nas.pareto import pareto_mask
from actors.nas.space import Config, Key, SearchSpace
from actors.nas.strategies.base import FAILED, BatchStrategy
from actors.nas.strategies.nsga2 import genome_problem, integer_nsga2
from actors.nas.strategies.predictors import ObjectivePredictor, kendall_tau, mape

MIN_SCORED = 5  # measured points a predictor's quality is scored on, at least (or a batch)


class Linas(BatchStrategy):
    def __init__(
        self,
        space: SearchSpace,
        objectives: Sequence[str],
        seed: int = 0,
        population: int = 50,
        batch: int = 25,
        inner_generations: int = 50,
        counted: Callable[[Config], dict[str, float]] | None = None,
        counted_names: Sequence[str] = (),
    ):
        super().__init__(space, objectives, seed)
        self.population = population
        self.batch = batch
        self.inner_generations = inner_generations
        self.counted = counted
        self.counted_names = [o for o in self.objectives if o in counted_names and counted]
        self.predicted_names = [o for o in self.objectives if o not in self.counted_names]
        self.seen: dict[Key, np.ndarray] = {}
        self.quality: list[dict[str, float | str]] = []
        self._predictions: dict[str, np.ndarray] = {}
        self._refits = 0

    def _propose(self) -> list[Config]:
        if not self.seen:
            return self._random_unseen(self.population)
        ok = [(k, v) for k, v in self.seen.items() if v[0] < FAILED]
        if len(ok) < 2:
            return self._random_unseen(self.batch)
        features = self._features([self.space.from_key(k) for k, _ in ok])
        values = np.array([v for _, v in ok])
        predictors = {}
        for name in self.predicted_names:
            column = self.objectives.index(name)
            predictors[name] = ObjectivePredictor(seed=self.seed).fit(features, values[:, column])
        self._refits += 1
        self._fitted = predictors
        chosen = self._inner_search(predictors)
        if not chosen:
            chosen = self._random_unseen(self.batch)
        if not chosen:  # every sub-network of the space has been validated
            return []
        self._predictions = {n: p.predict(self._features(chosen)) for n, p in predictors.items()}
        return chosen

    def _advance(self, batch: list[Config], values: np.ndarray) -> None:
        ok = values[:, 0] < FAILED
        # a rank correlation or a mean error of fewer measured points says nothing (the
        # inner search proposes only a few new sub-networks once the front is well known)
        if self._predictions and ok.sum() >= min(MIN_SCORED, self.batch):
            for name, predicted in self._predictions.items():
                measured = values[ok, self.objectives.index(name)]
                self.quality.append(
                    {
                        "refit": self._refits,
                        "objective": name,
                        "model": self._fitted[name].family_,
                        "cv_rmse": _finite(self._fitted[name].cv_rmse_),
                        "mape": _finite(mape(predicted[ok], measured)),
                        # undefined (None) where the predictions are all equal
                        "kendall_tau": _finite(kendall_tau(predicted[ok], measured)),
                        "validated": len(self.seen) + len(batch),
                    }
                )
        self._predictions = {}
        for config, value in zip(batch, values, strict=True):
            self.seen[self.space.key(config)] = value

    def _features(self, configs: list[Config], counts: list[dict] | None = None) -> np.ndarray:
        """One-hot choices, plus the log of the counted measures (params, MACs) when the
        super-network counts them: capacity is what a sub-network's error follows most,
        and one-hot features can only express it as a sum of per-choice effects.
        `counts`: the configs' counted measures, when the caller has them already."""
        onehot = self.space.one_hot(configs)
        if not self.counted:
            return onehot
        if counts is None:
            counts = [self.counted(c) for c in configs]
        names = sorted(counts[0]) if counts else []
        capacity = np.log1p(np.array([[c[n] for n in names] for c in counts], dtype=float))
        return np.hstack([onehot, capacity.reshape(len(configs), len(names))])

    def _objective_matrix(self, configs: list[Config], predictors) -> np.ndarray:
        counts = [self.counted(c) for c in configs] if self.counted else None
        features = self._features(configs, counts)
        columns = []
        for name in self.objectives:
            if name in predictors:
                columns.append(predictors[name].predict(features))
            else:
                columns.append(np.array([c[name] for c in counts]))
        return np.stack(columns, axis=1)

    def _inner_search(self, predictors) -> list[Config]:
        """The inner NSGA-II's final population, best predicted fronts first, unvalidated
        only, spread evenly along the first objective, at most `batch`."""
        from pymoo.core.problem import Problem

        space, outer = self.space, self

        class Predicted(Problem):
            def __init__(self):
                base = genome_problem(space, len(outer.objectives))
                super().__init__(
                    n_var=base.n_var, n_obj=base.n_obj, xl=base.xl, xu=base.xu, vtype=int
                )

            def _evaluate(self, x, out, *args, **kwargs):
                out["F"] = outer._objective_matrix([space.decode(v) for v in x], predictors)

        from pymoo.optimize import minimize

        result = minimize(
            Predicted(),
            integer_nsga2(self.population),
            ("n_gen", self.inner_generations),
            seed=int(self.rng.integers(2**31)),
            verbose=False,
        )
        configs, keys = [], set()
        for x in result.pop.get("X"):
            config = space.decode(x)
            key = space.key(config)
            if key not in self.seen and key not in keys:
                keys.add(key)
                configs.append(config)
        if not configs:
            return []
        values = self._objective_matrix(configs, predictors)
        ranked: list[int] = []
        remaining = np.arange(len(configs))
        while len(remaining) and len(ranked) < self.batch:
            layer = remaining[pareto_mask(values[remaining])]
            layer = layer[np.argsort(values[layer, 0], kind="stable")]
            room = self.batch - len(ranked)
            if len(layer) > room:  # evenly spaced along the first objective
                layer = layer[np.unique(np.linspace(0, len(layer) - 1, room).round().astype(int))]
            ranked.extend(int(i) for i in layer)
            remaining = np.setdiff1d(remaining, layer)
        return [configs[i] for i in ranked]

    def _random_unseen(self, n: int) -> list[Config]:
        out, keys = [], set(self.seen)
        for _ in range(100 * n):
            if len(out) == n:
                break
            config = self.space.sample(self.rng)
            key = self.space.key(config)
            if key not in keys:
                keys.add(key)
                out.append(config)
        if len(out) < n:  # a space nearly all validated (so a small one): the rest, listed
            out += [c for c in self.space.enumerate() if self.space.key(c) not in keys][
                : n - len(out)
            ]
        return out


def _finite(value: float) -> float | None:
    """`value`, or None where it is not a number (strict JSON has no NaN)."""
    return float(value) if np.isfinite(value) else None
