"""The trained model: network + constraint + partition, as one torch module.

`PDESurrogate(initial) -> u` is what MLflow logs and `physflow evaluate` loads. In
training, `step(initial, generator)` also returns the experts' diagnostics; the experts
run wherever `executor` says (Ray actors during training, this process by default).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from actors.constraint import LMOptions
from actors.expert import ExpertConfig
from actors.experts import InProcessExperts, Solved, solve_experts
from actors.pinn import (
    BasisNetwork,
    Partition,
    SoftConstrained,
    constraint_for,
    expert_problems,
)

# The diffusion-sorption constraint's switches, as models saved before each existed solved.
DS_SWITCHES_BEFORE = {
    "balance_rows": False,
    "balance_each_group": False,
    "global_conditions": False,
}


class PDESurrogate(nn.Module):
    def __init__(
        self,
        kind: str,
        pde: str,
        parameters: dict[str, float],
        grids: dict[str, torch.Tensor],
        basis: int,
        width: int,
        modes: int,
        layers: int,
        splits: tuple[int, ...],
        options: LMOptions,
        collocation_points: int,
    ):
        super().__init__()
        if kind not in ("moe", "hc", "sc"):
            raise ValueError(f"kind {kind!r}: expected 'moe', 'hc' or 'sc'")
        self.kind, self.pde, self.pde_parameters = kind, pde, dict(parameters)
        self.options, self.collocation_points = options, collocation_points
        self.axes = list(grids)
        for axis, grid in grids.items():
            self.register_buffer(f"grid_{axis}", grid.to(torch.float64))
        self.constraint = constraint_for(pde, self.pde_parameters)
        for switch in DS_SWITCHES_BEFORE:  # recorded: `__setstate__` reads them
            if hasattr(self.constraint, switch):
                self.pde_parameters[switch] = getattr(self.constraint, switch)
        self.partition = Partition(tuple(len(g) for g in grids.values()), tuple(splits))
        if kind == "sc":
            self.network = SoftConstrained.for_constraint(
                self.constraint, width=width, modes=modes, layers=layers
            )
        else:
            self.network = BasisNetwork.for_constraint(
                self.constraint, num_basis=basis, width=width, modes=modes, layers=layers
            )
        self.basis_size = basis
        self.executor: Any = None  # set by the trainer; in-process when left None

    @property
    def grids(self) -> dict[str, torch.Tensor]:
        return {a: getattr(self, f"grid_{a}") for a in self.axes}

    @property
    def num_experts(self) -> int:
        return 0 if self.kind == "sc" else self.partition.num_experts

    def expert_config(self) -> ExpertConfig:
        return ExpertConfig(self.pde, self.pde_parameters, self.options, self.basis_size)

    @property
    def device(self) -> torch.device:
        return getattr(self, f"grid_{self.axes[0]}").device

    def _executor(self):
        in_process = isinstance(self.executor, InProcessExperts)
        if self.executor is None or (in_process and self.executor.device != str(self.device)):
            self.executor = InProcessExperts(
                self.expert_config(), self.num_experts, str(self.device)
            )
        return self.executor

    def fields(
        self,
        initial: torch.Tensor,
        generator: torch.Generator | None = None,
        points: int | None = None,
    ) -> tuple[dict[str, torch.Tensor], Solved | None]:
        """initial (B, *space) -> the solution's fields on the grid (the solution and the
        derivatives the PDE needs) and the experts' record (None for sc)."""
        initial = initial.to(self.device)
        if self.kind == "sc":
            u = self.network(initial, self.grids).to(torch.float64)  # (B, *grid)
            derivs = self.constraint.derivatives(u[:, None], self.grids)
            return {k: v[:, 0] for k, v in derivs.items()}, None
        basis = self.network(initial, self.grids).to(torch.float64)  # (B, N, *grid)
        basis = unit_rms(basis)
        derivs = self.constraint.derivatives(basis, self.grids)
        params = expert_problems(
            self.constraint,
            basis,
            initial.to(torch.float64),
            self.grids,
            self.partition,
            points or self.collocation_points,
            generator,
            derivs=derivs,
        )
        omegas, solved = solve_experts(self._executor(), params)
        fields = self.constraint.assembled_fields(derivs, omegas, self.partition, self.grids)
        return fields, solved

    def step(
        self,
        initial: torch.Tensor,
        generator: torch.Generator | None = None,
        points: int | None = None,
    ) -> tuple[torch.Tensor, Solved | None]:
        """initial (B, *space) -> u (B, *grid) and the experts' record (None for sc)."""
        fields, solved = self.fields(initial, generator, points)
        return fields[self.constraint.value_key], solved

    def loss(
        self, initial: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Solved | None]:
        """The physics-only training loss -> (loss, u, experts' record)."""
        fields, solved = self.fields(initial, generator)
        loss = self.constraint.fields_loss(fields, initial.to(self.device, torch.float64))
        return loss, fields[self.constraint.value_key], solved

    def forward(self, initial: torch.Tensor) -> torch.Tensor:
        """Inference: as many collocation points per expert as in training, drawn with a
        fixed seed — deterministic, and bounded in memory (every point of a 64³ Navier–Stokes
        grid would need gigabytes of rows per sample)."""
        u, _ = self.step(initial, torch.Generator().manual_seed(0))
        return u

    def on_grids(self, grids: dict[str, torch.Tensor]) -> PDESurrogate:
        """A copy of this model on other grids of its domain, e.g. a finer one (the Navier-
        Stokes test of the paper: trained on 64², scored on 256²). The weights are the
        same: the FNO's spectral layers keep Fourier modes, not grid points, and its other
        layers act pointwise; the sub-domains are the same splits of the new grid.

        What the model counts in grid points is scaled with the grid: the FNO's zero
        padding of a non-periodic axis, in proportion to the axis' points (so that the kept
        modes are about the same frequencies of the domain), and diffusion-sorption's
        settling levels, to leave out the same time after t = 0. Kept in points, the
        quickstart's model (26 × 128) scored 40 % on 101 × 128 and 20 % on 26 × 1 024,
        against 3.6 % on its own grid; scaled, 7.8 and 4.6 %. (A padding that keeps the
        padded period exactly, 27 levels instead of 23 on 101, scored 20 %: the trained
        network is that sensitive to it; on 51 levels 10 / 11 / 12 / 13 / 14 levels gave
        18 / 7.3 / 5.5 / 9.8 / 18 %, 12 the proportional one.)"""
        if list(grids) != self.axes:
            raise ValueError(f"grids must have the axes {self.axes}, got {list(grids)}")
        shape = tuple(len(g) for g in grids.values())
        fno, old = self.network.fno, self.partition.grid_shape
        padding = tuple(round(p * n / o) for p, n, o in zip(fno.padding, shape, old, strict=True))
        trained, now = fno.kept_modes(old), fno.kept_modes(shape, padding)
        for axis, n, a, b in zip(self.axes, shape, trained, now, strict=True):
            if a != b:  # modes the training grid did not resolve: weights never trained
                raise ValueError(
                    f"axis {axis} of {n} points: the network would act on {b} Fourier modes "
                    f"there, but was trained on {a} (its training grid had "
                    f"{self.partition.grid_shape[self.axes.index(axis)]} points)"
                )
        partition = Partition(shape, self.partition.splits)
        clone = copy.deepcopy(self)  # without the executor (`__getstate__`)
        for axis, grid in grids.items():
            clone.register_buffer(f"grid_{axis}", grid.to(self.device, torch.float64))
        clone.partition = partition
        clone.network.fno.padding = padding
        levels, t = getattr(self.constraint, "settling_levels", 0), self.grids.get("t")
        if levels and levels < len(t):
            # the new grid's levels before the first level that counted on the training grid
            before = int((grids["t"].to(t) < t[levels] - 1e-9 * t[-1]).sum())
            clone.constraint = replace(self.constraint, settling_levels=max(levels, before))
        return clone

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Diffusion-sorption models saved before `balance_rows` existed solved with
        # unweighted rows, those saved before `balance_each_group` with one weight for all
        # initial and boundary rows, those saved before `global_conditions` with only the
        # initial and boundary rows inside each expert's block: each is loaded to solve as
        # it was trained.
        if self.pde == "diffusion-sorption":
            saved = self.pde_parameters
            missing = {k: v for k, v in DS_SWITCHES_BEFORE.items() if k not in saved}
            if missing:
                self.pde_parameters = {**saved, **missing}
                self.constraint = constraint_for(self.pde, self.pde_parameters)

    def __getstate__(self) -> dict[str, Any]:
        # Executors hold processes and Ray handles: never part of a saved model.
        state = self.__dict__.copy()
        state["executor"] = None
        return state


def unit_rms(basis: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """Scale each basis function of each sample to unit RMS over the grid.

    The ridge term of the experts' problems (ridge·ω) is not scale-invariant: a network can
    shrink its basis until the ridge outweighs the data rows, so that ω -> 0 and u = b·ω -> 0,
    which satisfies diffusion–sorption's PDE exactly and trades the boundary residual for it.
    With unit-RMS functions that direction does not exist. (B, N, *grid) -> same.
    """
    return _UnitRMS.apply(basis, floor)


class _UnitRMS(torch.autograd.Function):
    """y = x / s, s = max(sqrt(mean(x²)), floor) over the grid, with the backward in closed
    form: dx = (g - y · mean(g·y)) / s (g / s where the floor holds s). Autograd's own chain
    (the division's backward, and pow's, which goes through pow(x, 1.0)) took 28 ms for a
    (4, 16, 51, 512) basis on 2 cores, this takes 5."""

    @staticmethod
    def forward(ctx, basis: torch.Tensor, floor: float) -> torch.Tensor:
        dims = tuple(range(2, basis.dim()))
        scale = basis.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp_min(floor)
        out = basis / scale
        ctx.save_for_backward(out, scale)
        ctx.floor = floor
        return out

    @staticmethod
    @once_differentiable  # the scale is a constant to this backward: no second derivative
    def backward(ctx, grad: torch.Tensor):
        out, scale = ctx.saved_tensors
        count = out[0, 0].numel()
        # mean(g·y) per sample and function as one batched dot product: no temporary of
        # the basis' size
        flat = out.reshape(out.shape[0] * out.shape[1], 1, -1)
        dot = torch.bmm(flat, grad.reshape(flat.shape[0], -1, 1)).reshape(scale.shape) / count
        dot = torch.where(scale > ctx.floor, dot, 0.0)  # a floored scale is a constant
        return torch.addcmul(grad, out, dot, value=-1.0).div_(scale), None
