"""Building the experts' problems, and solving them in this process (tests, quick use).

`expert_problems` is the driver-side half of a PI-HC(-MoE) step without the network:
differentiate the basis once on the global grid, draw each expert's collocation points,
and cut out each expert's parameter tuple. What runs the solves (in-process, Ray actors)
only needs those tuples (detached) and `constraint.residual_fn`.

`solve_in_process` does the rest in-process with `actors.constraint.solve` and assembles u.
When the basis requires grad, the tuples keep their graph, the solver differentiates
omega implicitly (the implicit function theorem at the solution), and u is differentiable
w.r.t. the basis both directly (u = b . omega) and through omega.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from actors.pinn.model import assemble
from actors.pinn.partition import Partition
from actors.pinn.rows import gather_blocks


def expert_problems(
    constraint: Any,
    basis: Tensor,
    initial: Tensor,
    grids: Mapping[str, Any],
    partition: Partition,
    m: int,
    generator: torch.Generator | None = None,
    derivs: dict[str, Tensor] | None = None,
) -> list[tuple[Tensor, ...]]:
    """basis (B, N, *grid), initial (B, *space) -> per expert its params tuple (leading B),
    with m collocation points per sub-domain (shared by the batch, redrawn per call).
    The tuples are differentiable w.r.t. the basis when it requires grad. `derivs`, the
    basis' derivatives if the caller has them already.

    Each expert's rows are gathered into a block of their own, as they are shipped, and
    the backward scatters every expert's block into one gradient per field
    (`gather_blocks`)."""
    if derivs is None:
        derivs = constraint.derivatives(basis, grids)
    # no point where the PDE is not imposed (its rows would be zeros: no say in the solve)
    first = getattr(constraint, "settling_levels", 0)
    points = [partition.sample(k, m, generator, first) for k in range(partition.num_experts)]
    blocks = {key: gather_blocks(derivs[key], points) for key in constraint.row_keys}
    return [
        constraint.expert_params(
            derivs, initial, partition, k, points[k], grids, {key: blocks[key][k] for key in blocks}
        )
        for k in range(partition.num_experts)
    ]


def solve_in_process(
    constraint: Any,
    basis: Tensor,
    initial: Tensor,
    grids: Mapping[str, Any],
    partition: Partition,
    m: int,
    generator: torch.Generator | None = None,
    options: Any = None,
) -> tuple[Tensor, list[Any]]:
    """Solve every expert in this process -> (u (B, *grid), per-expert diagnostics).

    `actors.constraint.solve` from the residual's initial guess (else 0) with `options`
    (its defaults when None), differentiable (implicitly) when the basis requires grad;
    the diagnostics are each solve's `LMSolution.summary()`.
    """
    from actors.constraint import solve, starting_point

    problems = expert_problems(constraint, basis, initial, grids, partition, m, generator)
    extra = {} if options is None else {"options": options}
    omegas, diagnostics = [], []
    for params in problems:
        start = starting_point(constraint.residual_fn, params, basis.shape[1])
        omega, solution = solve(constraint.residual_fn, params, start, **extra)
        omegas.append(omega)
        diagnostics.append(solution.summary())
    return assemble(basis, omegas, partition), diagnostics
