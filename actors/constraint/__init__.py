"""Hard-constraint solver: batched Levenberg-Marquardt with implicit differentiation.

* `levenberg_marquardt` - P independent nonlinear least-squares problems, no autograd,
  per-problem convergence, result codes (`RESULTS`) instead of hidden failures.
* `solve` / `ImplicitSolve` - the same solve whose gradient w.r.t. the problem tensors comes
  from the implicit function theorem at the solution (`optimality`, `implicit_vjp`).
* `solve_unrolled` - the baseline: autograd through every iteration.
"""

from actors.constraint.implicit import ImplicitSolve, implicit_vjp, optimality, solve
from actors.constraint.levenberg_marquardt import ResidualFn, levenberg_marquardt, starting_point
from actors.constraint.solution import RESULTS, LMOptions, LMSolution, SolverError
from actors.constraint.unrolled import solve_unrolled

__all__ = [
    "RESULTS",
    "ImplicitSolve",
    "LMOptions",
    "LMSolution",
    "ResidualFn",
    "SolverError",
    "implicit_vjp",
    "levenberg_marquardt",
    "optimality",
    "solve",
    "solve_unrolled",
    "starting_point",
]
