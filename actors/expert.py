"""One expert: the constraint solve of one sub-domain, forward and implicit backward.

`ExpertSolver` is stateless between calls on purpose: the backward receives again the
parameters and the solution it needs. A restarted expert (after its process or node died)
can therefore serve a retried call without any state being lost, and the same object runs
in-process (tests, tiny problems) or inside a Ray actor (`actors.experts`).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from actors.constraint import LMOptions, implicit_vjp, levenberg_marquardt, starting_point
from actors.pinn import constraint_for


@dataclass(frozen=True)
class ExpertConfig:
    """What every expert of a model shares: the PDE, its parameters, solver options."""

    pde: str
    parameters: dict[str, float]
    options: LMOptions
    basis_size: int  # N, the unknowns of each solve


class ExpertSolver:
    """Solve expert k's problems for a batch; differentiate the solution implicitly."""

    def __init__(self, config: ExpertConfig, device: str = "cpu", keep_on_device: bool = False):
        self.config = config
        self.device = torch.device(device)
        # Results go back to the host for Ray; in-process they stay where the model is.
        self.out = self.device if keep_on_device else torch.device("cpu")
        self.residual_fn = constraint_for(config.pde, config.parameters).residual_fn
        # Changes when a process is replaced: the driver counts restarts with it.
        self.incarnation = uuid.uuid4().hex[:8]
        self.pid = os.getpid()

    def _to_device(self, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(p.to(self.device, torch.float64) for p in params)

    def solve(self, params: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        """params: tensors with leading dim B -> {"omega": (B, N), "diagnostics": {...}}."""
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            params = self._to_device(params)
            omega0 = starting_point(self.residual_fn, params, self.config.basis_size)
            solution = levenberg_marquardt(self.residual_fn, omega0, params, self.config.options)
        return {
            "omega": solution.omega.to(self.out),
            "diagnostics": {
                **solution.summary(),
                "seconds": time.perf_counter() - t0,  # wall time
                "cpu_seconds": time.process_time() - c0,  # this process's CPU time (work)
            },
            "converged": solution.converged.cpu(),
            "incarnation": self.incarnation,
        }

    def vjp(
        self,
        params: tuple[torch.Tensor, ...],
        omega: torch.Tensor,
        omega_bar: torch.Tensor,
    ) -> dict[str, Any]:
        """Gradients w.r.t. params of <omega_bar, omega(params)> by the implicit function
        theorem at the given solution; a row matrix's gradient may come as its `RowOuter`
        factors (`actors.constraint.residual.dense` expands it)."""
        t0 = time.perf_counter()
        stats: dict[str, int] = {}
        grads = implicit_vjp(
            self.residual_fn,
            omega.to(self.device, torch.float64),
            self._to_device(params),
            omega_bar.to(self.device, torch.float64),
            stats=stats,
            factored=True,  # row matrices' cotangents as rank-2 factors: N / 2 times smaller
        )
        return {
            "grads": tuple(g.to(self.out) for g in grads),
            "diagnostics": {**stats, "seconds": time.perf_counter() - t0},
            "incarnation": self.incarnation,
        }

    def where(self) -> dict[str, Any]:
        """Where this expert runs: for placement checks and logs."""
        return {"pid": self.pid, "device": str(self.device), "incarnation": self.incarnation}
