"""NSGA-II (pymoo) over the integer genome of choice indices, driven by ask/tell."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from actors.nas.space import Config, SearchSpace
from actors.nas.strategies.base import BatchStrategy


def integer_nsga2(population: int):
    """pymoo's NSGA-II with integer sampling, rounded SBX and polynomial mutation."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling

    return NSGA2(
        pop_size=population,
        sampling=IntegerRandomSampling(),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )


def genome_problem(space: SearchSpace, objectives: int):
    from pymoo.core.problem import Problem

    return Problem(
        n_var=len(space.names), n_obj=objectives, xl=0, xu=space.upper_bounds(), vtype=int
    )


class NSGA2Search(BatchStrategy):
    def __init__(
        self, space: SearchSpace, objectives: Sequence[str], seed: int = 0, population: int = 50
    ):
        super().__init__(space, objectives, seed)
        self.problem = genome_problem(space, len(self.objectives))
        self.algorithm = integer_nsga2(population)
        self.algorithm.setup(self.problem, seed=seed, termination=("n_gen", 10**9))
        self._population = None

    def _propose(self) -> list[Config]:
        self._population = self.algorithm.ask()
        return [self.space.decode(x) for x in self._population.get("X")]

    def _advance(self, batch: list[Config], values: np.ndarray) -> None:
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        Evaluator().eval(StaticProblem(self.problem, F=values), self._population)
        self.algorithm.tell(infills=self._population)
