"""Baseline: differentiate the Levenberg-Marquardt solve by back-propagating through it.

`solve_unrolled` runs exactly the iterations of `levenberg_marquardt` (same solver object,
same driver `run_solver`, same per-problem masks: a converged problem stops changing, and
the loop ends when every problem has stopped or after `options.max_iterations` steps), but
with autograd recording every step: each iteration's Jacobian, Cholesky factor and trial
residual stay in the graph. The damping control (gain ratio, mu, accept masks) is not
differentiated, so the recorded map is a fixed sequence of damped Gauss-Newton updates whose
derivative tends to the implicit one as the iterates converge.

Why keep it: it is the reference the benchmark measures the implicit backward against -
memory grows with the number of iterations times (P, M, N), and backward time with the
iterations - and an autograd-independent check of the implicit gradient in the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from actors.constraint.levenberg_marquardt import (
    LevenbergMarquardt,
    ResidualFn,
    _validate,
    initial_omega,
    run_solver,
)
from actors.constraint.solution import LMOptions


def solve_unrolled(
    residual_fn: ResidualFn,
    params: tuple[Tensor, ...],
    omega0: Tensor | None = None,
    options: LMOptions = LMOptions(),
    *,
    n_unknowns: int | None = None,
) -> Tensor:
    """omega (P, N) with autograd recorded through every LM iteration.

    omega0 defaults to zeros (P, n_unknowns). No diagnostics are returned: this is a
    baseline; use `levenberg_marquardt` or `solve` to see convergence.
    """
    omega0 = initial_omega(params, omega0, n_unknowns)
    params = _validate(omega0, params, options)
    with torch.enable_grad():
        state, _, _ = run_solver(LevenbergMarquardt(options), residual_fn, omega0, params)
    return state.omega
