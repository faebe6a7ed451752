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
from actors.constraint.residual import RowOuter
from actors.constraint.solution import LMSolution
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
        return self.solve_all([params])[0]

    def solve_all(self, batches: list[tuple[torch.Tensor, ...]]) -> list[dict[str, Any]]:
        """Several experts' problems (the same shapes each) in one solve: one LM loop over
        all of them, as `solve` gives for each alone (every problem keeps its own damping,
        iterations and stop), in one launch of each kernel instead of one per expert, which
        is what a GPU spends its time on at these sizes. Each expert's part comes back with
        its own diagnostics; their times are the whole solve's."""
        t0, c0 = time.perf_counter(), time.process_time()
        sizes = [b[0].shape[0] for b in batches]
        with torch.no_grad():
            params = self._to_device(_joined(batches))
            omega0 = starting_point(self.residual_fn, params, self.config.basis_size)
            solution = levenberg_marquardt(self.residual_fn, omega0, params, self.config.options)
        times = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
        out = []
        for part in _parts(solution, sizes):
            out.append({
                "omega": part.omega.to(self.out),
                # wall time, and this process's CPU time (work)
                "diagnostics": {**part.summary(), **times},
                "converged": part.converged.cpu(),
                "incarnation": self.incarnation,
            })  # fmt: skip
        return out

    def vjp(
        self,
        params: tuple[torch.Tensor, ...],
        omega: torch.Tensor,
        omega_bar: torch.Tensor,
    ) -> dict[str, Any]:
        """Gradients w.r.t. params of <omega_bar, omega(params)> by the implicit function
        theorem at the given solution; a row matrix's gradient may come as its `RowOuter`
        factors (`actors.constraint.residual.dense` expands it)."""
        return self.vjp_all([params], [omega], [omega_bar])[0]

    def vjp_all(
        self,
        batches: list[tuple[torch.Tensor, ...]],
        omegas: list[torch.Tensor],
        omega_bars: list[torch.Tensor],
    ) -> list[dict[str, Any]]:
        """`vjp` for several experts' problems at once (what `solve_all` solved)."""
        t0 = time.perf_counter()
        sizes = [b[0].shape[0] for b in batches]
        stats: dict[str, int] = {}
        grads = implicit_vjp(
            self.residual_fn,
            _joined(omegas).to(self.device, torch.float64),
            self._to_device(_joined(batches)),
            _joined(omega_bars).to(self.device, torch.float64),
            stats=stats,
            factored=True,  # row matrices' cotangents as rank-2 factors: N / 2 times smaller
        )
        seconds = time.perf_counter() - t0
        parts = zip(*(_split(g.to(self.out), sizes) for g in grads), strict=True)
        # the singular and non-finite counts are the whole solve's: on the first part only,
        # so that a sum over the experts' answers counts each problem once
        none = dict.fromkeys(stats, 0)
        return [
            {
                "grads": tuple(part),
                "diagnostics": {**(none if k else stats), "seconds": seconds},
                "incarnation": self.incarnation,
            }
            for k, part in enumerate(parts)
        ]

    def where(self) -> dict[str, Any]:
        """Where this expert runs: for placement checks and logs."""
        return {"pid": self.pid, "device": str(self.device), "incarnation": self.incarnation}


def _joined(batches: list):
    """Experts' inputs (tensors, or tuples of them) as one batch; one expert's as they are
    (no copy on the path every Ray expert takes)."""
    if len(batches) == 1:
        return batches[0]
    if isinstance(batches[0], torch.Tensor):
        return torch.cat(batches)
    return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))


def _split(value, sizes: list[int]) -> list:
    """A tensor or `RowOuter` over the joined problems -> one per expert."""
    if len(sizes) == 1:
        return [value]
    if isinstance(value, RowOuter):
        pairs = zip(value.coefficients.split(sizes), value.vectors.split(sizes), strict=True)
        return [RowOuter(c, v) for c, v in pairs]
    return list(value.split(sizes))


def _parts(solution: LMSolution, sizes: list[int]) -> list[LMSolution]:
    if len(sizes) == 1:
        return [solution]
    fields = ("omega", "iterations", "residual_norm", "converged", "result")
    pieces = {f: getattr(solution, f).split(sizes) for f in fields}
    return [LMSolution(**{f: pieces[f][k] for f in fields}) for k in range(len(sizes))]
