"""The diffusion-sorption constraint: residuals for the experts and the physics loss.

PDE (PDEBench), x in (0, 1), t in (0, T]:

    u_t = D / R(u) u_xx,   R(u) = 1 + ((1 - phi) / phi) rho_s k n_f u^(n_f - 1)
    u(0, t) = 1 (inlet),   u(1, t) = -D u_x(1, t) (outflow; the data generator's sign)

Scaled residual. With tau = t / T and the equation multiplied through by R(u):

    r = R(u) u_tau - T D u_xx

Why: t runs to 500 while D = 5e-4, so u_t and D u_xx are both O(1e-3) and far below the
O(1) initial/boundary residuals; u_tau and T D u_xx (T D = 0.25) are O(1). Multiplying by
R instead of dividing keeps the residual polynomial-like in u_tau, u_xx and bounded where
R is large (R ~ 13 at u = 1e-6), and it is the form the finite-volume data generator
conserves (R = dC/du of the total concentration). u^(n_f - 1) is singular at u = 0 and
undefined below: R is evaluated at max(u, 1e-6), as in the generator.

Derivatives (see `stencils`): u_tau by second-order central differences in time,
one-sided at t = 0 and t = T; u_xx by second-order central differences, one-sided
four-point at the first and last cell. The boundary conditions live on the faces x = 0
and x = 1, which are not grid points (the data are at cell centres (i + 0.5) / nx): u and
u_x there are extrapolated from the three nearest centres by Lagrange interpolation
(third order for the value, second for the slope). The stencil weights come from the
actual grid coordinates, so a vertex-centred grid works as well.

Expert k's residual r(omega) (one sample; `diffusion_sorption_residual`) stacks:

    m PDE rows       R(U omega) (T_ omega) - T D (X omega) at its collocation points
    initial rows     u(0, x) - u0(x) at every x
    inlet rows       u(0, t) - 1 at every t > 0
    outflow rows     u(1, t) + D u_x(1, t) at every t > 0
    ridge rows       ridge * omega

The basis is global, so each expert's omega is held to the whole initial condition and
both whole boundaries, as the paper's code does for diffusion-sorption (it replicates
them to every expert), while its PDE rows are its block's own. With only the parts inside
its block (`global_conditions=False`, how models saved before were trained) an interior
expert of a [1, 4] split has no boundary at all, and for a small initial value u = 0
meets its rows almost exactly: in the quick benchmark the test sample with u0 = 0.004 came
out as u ~ 0 over three quarters of the domain (31 % test error against 3 % for the
others).

The boundary rows skip t = 0: the data's initial condition (u0 ~ U(0, 0.2)) does not
satisfy u(0) = 1, and the initial rows already pin that time level. With `balance_rows`
(the default) each group of rows (initial, inlet, outflow), and its targets, is multiplied
by w_g = sqrt(PDE rows / rows of the group): each group's sum of squares is then that of
the PDE rows times its mean square, and the solve weighs the groups as the loss weighs its
terms (one RMS each). Unweighted, an expert's thousands of PDE rows outvote its few dozen
initial and boundary rows, and u = 0 (which satisfies the PDE exactly) pulls the solution
towards itself. In the quick benchmark (48 samples, 1 000 steps) PI-HC-MoE's test error
went from 8.1 / 11.9 / 5.7 % to 5.5 / 6.8 / 6.7 % over seeds 0 / 1 / 2. One weight for all
three groups (`balance_each_group=False`, how models saved before were trained) left a
single solve's 20 inlet rows outvoted by its 256 initial rows: PI-HC then missed the inlet's
u = 1 by half in one seed of three (test error 36.8 % against 7.3 % with a weight per group).

Physics loss (all three variants): per sample the root-mean-square of the PDE residual
over the full grid plus the RMS of the initial, inlet and outflow residuals; mean over
the batch. A split domain adds `interface_weight` times the RMS of the jumps between
neighbouring experts (u, and across x the flux T D u_x, each side extrapolated to the
common face with its own omega): the solves stay independent, but without it the
experts of a [1, 4] split drift to solutions of their own (test relative L2 32.6 % after
1 000 quick-benchmark steps, 2.7 % with it).
RMS (the 2-norm over sqrt(point count)) keeps the loss independent of the resolution.
Expect the data's own loss to be far from zero: the initial condition
(u0 ~ U(0, 0.2)) is incompatible with u(0, t) = 1, so u jumps at the inlet at t = 0 and
the first time levels' differences there are huge. For the finite-volume solution from
u0 = 0.1 the full-grid residual RMS is 5.0 / 6.7 / 8.0 on 41x32 / 101x128 / 201x256
grids (growing with resolution), but 0.05 / 0.03 / 0.04 from the fourth time level on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from actors.constraint.residual import ClosedFormResidual, outer_rows, quadratic_form
from actors.pde.diffusion_sorption import DiffusionSorption
from actors.pinn.model import assemble
from actors.pinn.partition import Partition
from actors.pinn.rows import check_points, gather_rows, rms
from actors.pinn.stencils import (
    first_derivative,
    grid_spacing,
    grid_values,
    lagrange_weights,
    second_derivative,
    traces,
)

INLET_CONCENTRATION = 1.0  # u(0, t)
SINGULARITY_GUARD = 1e-6  # R(u) is evaluated at max(u, this)


def _residual(omega: Tensor, params: tuple[Tensor, ...]) -> Tensor:
    """One expert's residual for ONE sample: omega (N,) -> r (M,), M = m + n_lin + N.

    params = (u_rows (m, N), tau_rows (m, N), xx_rows (m, N), lin_rows (n_lin, N),
    lin_target (n_lin,), constants (6,) = [sorption * n_f, n_f - 1, T D, ridge, guard, w]),
    w the weight the linear rows and targets already carry (only the initial guess reads it).
    Pure torch (vmap/jacfwd-safe): no in-place ops, no data-dependent control flow.
    """
    u_rows, tau_rows, xx_rows, lin_rows, lin_target, constants = params
    sorption, exponent, diffusion, ridge, guard, _ = constants.unbind(-1)
    u = u_rows @ omega  # (m,)
    retardation = 1.0 + sorption * torch.maximum(u, guard) ** exponent
    pde = retardation * (tau_rows @ omega) - diffusion * (xx_rows @ omega)  # (m,)
    return torch.cat([pde, lin_rows @ omega - lin_target, ridge * omega])


def _retardation_terms(omega: Tensor, params: tuple[Tensor, ...]):
    """Batched u, u_tau, R(u), R'(u), R''(u) at the PDE rows (P, m) each, and constants.

    Below the guard R is constant (u is clamped), so both derivatives vanish there."""
    u_rows, tau_rows, _, _, _, constants = params
    sorption, exponent, diffusion, ridge, guard, _ = (c[:, None] for c in constants.unbind(-1))
    w = omega.unsqueeze(-1)
    u = (u_rows @ w).squeeze(-1)
    u_tau = (tau_rows @ w).squeeze(-1)
    above = u > guard
    clamped = torch.maximum(u, guard)
    power = clamped**exponent
    retardation = 1.0 + sorption * power
    slope = torch.where(above, sorption * exponent * power / clamped, 0.0)
    bend = torch.where(above, sorption * exponent * (exponent - 1.0) * power / clamped**2, 0.0)
    return u_tau, retardation, slope, bend, diffusion, ridge


def _linearize(omega: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Batched r (P, M) and J's row blocks in closed form:
    J_pde = R(u) T + R'(u) u_tau U - T D X, then the linear rows and ridge * I.
    J_pde is built in place: one (P, m, N) tensor, no temporaries of that size."""
    u_rows, tau_rows, xx_rows, lin_rows, lin_target, _ = params
    u_tau, retardation, slope, _, diffusion, ridge = _retardation_terms(omega, params)
    w = omega.unsqueeze(-1)
    pde = retardation * u_tau - diffusion * (xx_rows @ w).squeeze(-1)
    jac_pde = tau_rows * retardation.unsqueeze(-1)
    jac_pde.addcmul_(u_rows, (slope * u_tau).unsqueeze(-1))
    jac_pde.addcmul_(xx_rows, -diffusion.unsqueeze(-1))
    n = omega.shape[-1]
    eye = torch.eye(n, dtype=omega.dtype, device=omega.device)
    r = torch.cat([pde, (lin_rows @ w).squeeze(-1) - lin_target, ridge * omega], dim=-1)
    return r, (jac_pde, lin_rows, ridge.unsqueeze(-1) * eye)


def _curvature(omega: Tensor, params: tuple[Tensor, ...], r: Tensor) -> Tensor:
    """sum_i r_i Hess(r_i) = U^T diag(r R'' u_tau) U + U^T diag(r R') T + T^T diag(r R') U
    (only the PDE rows are nonlinear)."""
    u_rows, tau_rows = params[0], params[1]
    u_tau, _, slope, bend, _, _ = _retardation_terms(omega, params)
    r_pde = r[:, : u_rows.shape[1]]
    mixed = quadratic_form(u_rows, r_pde * slope, tau_rows)
    return quadratic_form(u_rows, r_pde * bend * u_tau, u_rows) + mixed + mixed.mT


def _pullback(omega: Tensor, params: tuple[Tensor, ...], lam: Tensor):
    """Cotangents of g = J^T r along lam, F = sum_i r_i s_i with s = J lam; per PDE row
    (a, b, c = U lam, T lam, X lam; r = R u_tau - T D u_xx):

        dF/dX = -TD (s omega + r lam)
        dF/dT = (s R + r R' a) omega + r R lam
        dF/dU = (s R' u_tau + r (R' b + R'' u_tau a)) omega + r R' u_tau lam

    and dF/dL = s omega + r lam, dF/dtarget = -s for the linear rows."""
    u_rows, tau_rows, xx_rows, lin_rows, lin_target, _ = params
    u_tau, retardation, slope, bend, diffusion, _ = _retardation_terms(omega, params)
    w, v = omega.unsqueeze(-1), lam.unsqueeze(-1)
    a, b, c = ((rows @ v).squeeze(-1) for rows in (u_rows, tau_rows, xx_rows))
    r = retardation * u_tau - diffusion * (xx_rows @ w).squeeze(-1)
    s = retardation * b + slope * u_tau * a - diffusion * c
    r_lin = (lin_rows @ w).squeeze(-1) - lin_target
    s_lin = (lin_rows @ v).squeeze(-1)
    return (
        outer_rows(s * slope * u_tau + r * (slope * b + bend * u_tau * a), omega,
                   r * slope * u_tau, lam),
        outer_rows(s * retardation + r * slope * a, omega, r * retardation, lam),
        outer_rows(-diffusion * s, omega, -diffusion * r, lam),
        outer_rows(s_lin, omega, r_lin, lam),
        -s_lin,
        None,
    )  # fmt: skip


def _initial_guess(params: tuple[Tensor, ...]) -> Tensor:
    """Where LM starts: the least-squares solution with R frozen at the level of the
    expert's own targets (its initial values, the inlet's 1), a Picard step from a
    constant state. From omega = 0 instead, u = 0 sits at R's singularity, where R is
    largest and flat (the guard), and the solve can stay near u = 0: an interior expert
    whose initial values are small then pays only their size, and returns u ~ 0 over its
    whole block. (P, N)."""
    u_rows, tau_rows, xx_rows, lin_rows, lin_target, constants = params
    sorption, exponent, diffusion, ridge, guard, weight = constants.unbind(-1)  # (P,) each
    if lin_target.shape[-1]:
        level = torch.maximum(lin_target.abs().mean(-1) / weight, guard)
    else:
        level = torch.ones_like(guard)
    retardation = 1.0 + sorption * level**exponent
    pde = tau_rows * retardation[:, None, None] - xx_rows * diffusion[:, None, None]
    n = u_rows.shape[-1]
    normal = pde.mT @ pde + lin_rows.mT @ lin_rows
    normal = normal + (ridge**2)[:, None, None] * torch.eye(n, dtype=pde.dtype, device=pde.device)
    rhs = (lin_rows.mT @ lin_target.unsqueeze(-1)).squeeze(-1)
    omega, info = torch.linalg.solve_ex(normal, rhs.unsqueeze(-1))
    omega = omega.squeeze(-1)
    usable = (info == 0) & torch.isfinite(omega).all(-1)
    return torch.where(usable[:, None], omega, torch.zeros_like(omega))


diffusion_sorption_residual = ClosedFormResidual(
    "diffusion_sorption_residual",
    _residual,
    _linearize,
    _curvature,
    _pullback,
    initial_guess=_initial_guess,
)


@dataclass(frozen=True)
class DiffusionSorptionConstraint:
    """Physical parameters (PDEBench defaults), the time scale and the experts' ridge."""

    # The physical defaults are the simulator's, which hold PDEBench's values.
    diffusivity: float = DiffusionSorption.diffusivity  # D
    porosity: float = DiffusionSorption.porosity  # phi
    bulk_density: float = DiffusionSorption.bulk_density  # rho_s
    freundlich_k: float = DiffusionSorption.freundlich_k  # k
    freundlich_exponent: float = DiffusionSorption.freundlich_exponent  # n_f
    t_end: float = 500.0  # T: tau = t / T
    ridge: float = 1e-4
    # Weight of the interface term of the loss for split domains (0 leaves it out): the
    # jumps of u and of the diffusive flux T D u_x between neighbouring experts.
    interface_weight: float = 1.0
    # Weigh each expert's initial and boundary rows against its PDE rows as the loss does
    # (sqrt of the ratio of their counts); False leaves them unweighted, as in the paper.
    balance_rows: bool = True
    # ... the initial, inlet and outflow rows each a group of its own, as they are terms of
    # their own in the loss; False: one weight for all of them (models saved before).
    balance_each_group: bool = True
    # Every expert solves with the whole initial condition and both whole boundaries (the
    # basis is global, so its omega can meet them), not only the parts inside its block.
    global_conditions: bool = True
    # Time levels left out of the PDE residual (loss and expert rows): those whose time
    # derivative reaches t = 0. The data's initial value is incompatible with the inlet
    # condition, so u jumps there and the differences across that jump measure the jump,
    # not the model: with them, u = 0 scores better than the true solution.
    settling_levels: int = 2

    name: ClassVar[str] = "diffusion-sorption"
    field: ClassVar[str] = "u"
    value_key: ClassVar[str] = "u"  # the solution itself among `derivatives`' fields
    axes: ClassVar[tuple[str, ...]] = ("t", "x")
    periodic: ClassVar[tuple[bool, ...]] = (False, False)
    dims: ClassVar[int] = 2
    in_channels: ClassVar[int] = 3  # tau, x, u0
    residual_fn = diffusion_sorption_residual
    row_keys: ClassVar[tuple[str, ...]] = ("u", "u_tau", "u_xx")

    def __post_init__(self) -> None:
        for name in ("diffusivity", "freundlich_exponent", "t_end"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        for name in ("balance_rows", "balance_each_group", "global_conditions"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (isinstance(self.settling_levels, int) and self.settling_levels >= 0):
            raise ValueError(
                f"settling_levels must be an integer >= 0, got {self.settling_levels!r}"
            )
        for name in ("bulk_density", "freundlich_k", "ridge", "interface_weight"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if not (np.isfinite(self.porosity) and 0.0 < self.porosity <= 1.0):
            raise ValueError(f"porosity must be in (0, 1], got {self.porosity!r}")

    # -- geometry ------------------------------------------------------------------------

    @property
    def sorption(self) -> float:
        """((1 - phi) / phi) rho_s k n_f: R(u) = 1 + sorption * u^(n_f - 1)."""
        phi = self.porosity
        return (1.0 - phi) / phi * self.bulk_density * self.freundlich_k * self.freundlich_exponent

    def grid_shape(self, grids) -> tuple[int, int]:
        """(nt, nx) of grids["t"], grids["x"]."""
        for axis in self.axes:
            if axis not in grids:
                raise ValueError(f"grids: missing axis {axis!r} (have {sorted(grids)})")
        return len(grids["t"]), len(grids["x"])

    def _geometry(self, grids, shape: tuple[int, ...] | None = None) -> dict:
        nt, nx = self.grid_shape(grids)
        if shape is not None and tuple(shape) != (nt, nx):
            raise ValueError(f"field grid {tuple(shape)} does not match grids (nt, nx) {nt, nx}")
        dt = grid_spacing(grids, "t", nt, min_points=3)
        dx = grid_spacing(grids, "x", nx, min_points=4)
        x = grid_values(grids, "x")
        return {
            "dtau": dt / self.t_end,
            "dx": dx,
            "left_value": lagrange_weights(x[:3], 0.0),  # u(0) from the first 3 centres
            "right_value": lagrange_weights(x[-3:], 1.0),  # u(1) from the last 3
            "right_slope": lagrange_weights(x[-3:], 1.0, derivative=1),  # u_x(1)
        }

    def constants(self, dtype: torch.dtype, device=None) -> Tensor:
        """[sorption, n_f - 1, T D, ridge, guard] -> (5,), the scalars of the residual
        (`expert_params` appends each sample's row weight)."""
        values = [
            self.sorption,
            self.freundlich_exponent - 1.0,
            self.t_end * self.diffusivity,
            self.ridge,
            SINGULARITY_GUARD,
        ]
        return torch.tensor(values, dtype=dtype, device=device)

    def retardation(self, u: Tensor) -> Tensor:
        """R(u) with u^(n_f - 1) at max(u, 1e-6)."""
        guarded = torch.clamp(u, min=SINGULARITY_GUARD)
        return 1.0 + self.sorption * guarded ** (self.freundlich_exponent - 1.0)

    # -- the network's side --------------------------------------------------------------

    def inputs(self, initial: Tensor, grids) -> Tensor:
        """initial (B, nx) -> (B, 3, nt, nx): channels tau = t / T, x, u0 broadcast over t."""
        nt, nx = self.grid_shape(grids)
        if not isinstance(initial, Tensor) or initial.ndim != 2 or initial.shape[1] != nx:
            shape = tuple(initial.shape) if isinstance(initial, Tensor) else type(initial)
            raise ValueError(f"initial must be (B, {nx}), got {shape}")
        dtype, device = initial.dtype, initial.device
        t = torch.as_tensor(grid_values(grids, "t"), dtype=dtype, device=device) / self.t_end
        x = torch.as_tensor(grid_values(grids, "x"), dtype=dtype, device=device)
        batch = initial.shape[0]
        return torch.stack(
            [
                t[None, :, None].expand(batch, nt, nx),
                x[None, None, :].expand(batch, nt, nx),
                initial[:, None, :].expand(batch, nt, nx),
            ],
            dim=1,
        )  # (B, 3, nt, nx)

    def derivatives(self, basis: Tensor, grids) -> dict[str, Tensor]:
        """basis (B, N, nt, nx) -> {"u", "u_tau", "u_xx"}: (B, N, nt, nx) each, and the face
        traces {"u_left", "u_right", "ux_right"}: (B, N, nt) each (u_tau = du/d(t / T)), and
        "u_start", the initial time level (B, N, nx)."""
        if not isinstance(basis, Tensor) or basis.ndim != 4:
            raise ValueError("basis must be a (B, N, nt, nx) tensor")
        g = self._geometry(grids, basis.shape[2:])
        nx = basis.shape[-1]
        faces = traces(
            basis,
            [(g["left_value"], 0), (g["right_value"], nx - 3), (g["right_slope"], nx - 3)],
            axis=-1,
        )  # (B, N, nt, 3)
        return {
            "u": basis,
            "u_start": basis.select(-2, 0),  # (B, N, nx): t = 0, cut once for every expert
            "u_tau": first_derivative(basis, g["dtau"], axis=-2),
            "u_xx": second_derivative(basis, g["dx"], axis=-1),
            **dict(zip(("u_left", "u_right", "ux_right"), faces.unbind(-1), strict=True)),
        }

    def pde_residual(self, u: Tensor, u_tau: Tensor, u_xx: Tensor) -> Tensor:
        """R(u) u_tau - T D u_xx, elementwise."""
        return self.retardation(u) * u_tau - (self.t_end * self.diffusivity) * u_xx

    def residual_field(self, u: Tensor, grids) -> Tensor:
        """u (B, nt, nx) -> PDE residual on the full grid (B, nt, nx)."""
        if not isinstance(u, Tensor) or u.ndim != 3:
            raise ValueError("u must be a (B, nt, nx) tensor")
        d = self.derivatives(u[:, None], grids)
        return self.pde_residual(d["u"], d["u_tau"], d["u_xx"])[:, 0]

    def physics_loss(self, u: Tensor, initial: Tensor, grids) -> Tensor:
        """Mean over the batch of RMS(PDE) + RMS(initial) + RMS(inlet) + RMS(outflow), with
        the derivatives of u by the stencils (PI-SC, and any u on the grid)."""
        if not isinstance(u, Tensor) or u.ndim != 3:
            raise ValueError("u must be a (B, nt, nx) tensor")
        d = self.derivatives(u[:, None], grids)
        return self.fields_loss({k: v[:, 0] for k, v in d.items()}, initial)

    def assembled_fields(
        self,
        derivs: dict[str, Tensor],
        omegas: list[Tensor],
        partition: Partition,
        grids=None,
    ) -> dict[str, Tensor]:
        """u and its derivatives as b·ω_k inside each sub-domain: derivatives of the basis,
        not of the assembled u, so that the jumps between experts (nothing makes u
        continuous there) do not enter the loss as huge second differences. With `grids`
        and a split domain, also the jumps at the interfaces (`interface_jumps`)."""
        fields = {k: assemble(derivs[k], omegas, partition) for k in ("u", "u_tau", "u_xx")}
        u = fields["u"]
        omegas = [w.to(u.device, u.dtype) for w in omegas]  # as `assemble` takes them
        nt, nx = partition.grid_shape
        for key, side in (("u_left", 0), ("u_right", nx - 1), ("ux_right", nx - 1)):
            trace = derivs[key]  # (B, N, nt)
            out = trace.new_zeros(trace.shape[0], nt)
            for k, omega in enumerate(omegas):
                st, sx = partition.slices(k)
                if sx.start <= side < sx.stop:
                    out[:, st] = torch.einsum("bnt,bn->bt", trace[:, :, st], omega)
            fields[key] = out
        if grids is not None and self.interface_weight > 0 and partition.num_experts > 1:
            fields["jumps"] = self.interface_jumps(derivs["u"], omegas, partition, grids)
        return fields

    def interface_jumps(
        self, basis: Tensor, omegas: list[Tensor], partition: Partition, grids
    ) -> Tensor:
        """Where two experts' blocks meet, each side's u (and across x, its diffusive flux
        T D u_x) extrapolated to the common face from its own three nearest points with
        its own omega; the differences, concatenated -> (B, n_jumps).

        The experts solve independently and nothing in their problems ties one block to
        the next: each meets the initial and boundary conditions with its own omega, and
        its PDE rows only inside its block. In the loss, the jumps teach the shared basis
        to make the independent solutions meet, while the solves stay independent."""
        g = self._geometry(grids, basis.shape[2:])
        jumps = []
        for axis, step in ((1, g["dx"]), (0, g["dtau"])):
            # every face's stencils along this axis, both sides: one pass over the basis
            # (and one gradient) per axis, then each side's columns of its own block
            stencils, sides = [], []
            for k, j in partition.interfaces(axis):
                left, right = partition.slices(k), partition.slices(j)
                i = left[axis].stop  # first index of the right block
                if i - left[axis].start < 3 or right[axis].stop - i < 3:
                    continue  # too thin a block to extrapolate from three points
                face = (i - 0.5) * step
                for block, expert, first in ((left, k, i - 3), (right, j, i)):
                    coordinates = [(first + n) * step for n in range(3)]
                    columns = [len(stencils)]
                    stencils.append((lagrange_weights(coordinates, face), first))
                    if axis == 1:  # the flux too, across x
                        slope = lagrange_weights(coordinates, face, derivative=1)
                        columns.append(len(stencils))
                        stencils.append((self.t_end * self.diffusivity * slope, first))
                    sides.append((block[1 - axis], expert, columns))
            if not stencils:
                continue
            at = traces(basis, stencils, axis=2 + axis)  # (B, N, ..., n_stencils)
            values = []
            for other, expert, columns in sides:
                picked = at.narrow(2 + axis, columns[0], len(columns))  # consecutive
                picked = picked[:, :, other] if axis == 1 else picked[:, :, :, other]
                values.append(torch.einsum("bn...,bn->b...", picked, omegas[expert]))
            jumps += [(a - b).flatten(1) for a, b in zip(values[::2], values[1::2], strict=True)]
        if not jumps:
            return basis.new_zeros((basis.shape[0], 0))
        return torch.cat(jumps, dim=1)

    def fields_loss(self, fields: dict[str, Tensor], initial: Tensor) -> Tensor:
        """The loss from u's fields: u, u_tau, u_xx (B, nt, nx); u_left, u_right, ux_right
        (B, nt)."""
        u = fields["u"]
        if not isinstance(initial, Tensor) or tuple(initial.shape) != (u.shape[0], u.shape[2]):
            raise ValueError(f"initial must be {(u.shape[0], u.shape[2])} to match u")
        pde = self.pde_residual(u, fields["u_tau"], fields["u_xx"])  # (B, nt, nx)
        pde = pde[:, self.settling_levels :]
        initial_r = u[:, 0, :] - initial.to(u.dtype)  # (B, nx)
        inlet = fields["u_left"][:, 1:] - INLET_CONCENTRATION  # (B, nt - 1)
        outflow = fields["u_right"][:, 1:] + self.diffusivity * fields["ux_right"][:, 1:]
        per_sample = rms(pde, (1, 2)) + rms(initial_r, (1,)) + rms(inlet, (1,)) + rms(outflow, (1,))
        jumps = fields.get("jumps")
        if jumps is not None and jumps.shape[1]:
            per_sample = per_sample + self.interface_weight * rms(jumps, (1,))
        return per_sample.mean()

    # -- the experts' side ---------------------------------------------------------------

    def expert_params(
        self,
        derivs: dict[str, Tensor],
        initial: Tensor,
        partition: Partition,
        k: int,
        points: Tensor,
        grids=None,
        rows=None,
    ) -> tuple[Tensor, ...]:
        """Expert k's problem data for each sample (leading dim B):
        (u_rows (B, m, N), tau_rows (B, m, N), xx_rows (B, m, N), lin_rows (B, n_lin, N),
        lin_target (B, n_lin), constants (B, 6)) for `diffusion_sorption_residual`; the
        linear rows and targets weighted by `balance_rows`.

        Row gathers of `derivs`: differentiable w.r.t. the basis when it requires grad, so
        the implicit backward's gradient w.r.t. these tensors reaches the network. Detach
        them to ship them to an expert."""
        basis = derivs["u"]
        batch, n_basis, nt, nx = basis.shape
        if tuple(partition.grid_shape) != (nt, nx):
            raise ValueError(f"partition grid {partition.grid_shape} != basis grid {(nt, nx)}")
        if not isinstance(initial, Tensor) or tuple(initial.shape) != (batch, nx):
            raise ValueError(f"initial must be ({batch}, {nx})")
        points = check_points(points, batch, nt * nx).to(basis.device)
        # where the initial and boundary rows are taken: the whole domain, or (global
        # conditions off) only where they fall inside the expert's block
        st, sx = (slice(0, nt), slice(0, nx)) if self.global_conditions else partition.slices(k)
        dtype = basis.dtype
        if rows is None:
            rows = {key: gather_rows(derivs[key], points) for key in self.row_keys}
        rows = [rows[key] for key in self.row_keys]
        pde_rows = basis.new_full((batch,), float(points.shape[-1]))
        # points in the settling levels (`expert_problems` draws none): zero rows
        settling = points // nx < self.settling_levels if self.settling_levels else None
        if settling is not None and bool(settling.any()):
            settled = (~settling).to(dtype)[..., None]  # (B?, m, 1)
            rows = [r * settled for r in rows]  # zero rows: no say in the solve
            pde_rows = settled.sum((-2, -1)).to(basis.device).expand(batch)
        lin_rows, lin_target = [], []
        if st.start == 0:  # the initial condition
            lin_rows.append(derivs["u_start"][:, :, sx].transpose(1, 2))  # (B, n_x, N)
            lin_target.append(initial[:, sx].to(basis.device, dtype))
        times = slice(max(st.start, 1), st.stop)  # boundary rows for t > 0 only
        n_times = max(times.stop - times.start, 0)
        if sx.start == 0 and n_times:
            lin_rows.append(derivs["u_left"][:, :, times].transpose(1, 2))
            lin_target.append(basis.new_full((batch, n_times), INLET_CONCENTRATION))
        if sx.stop == nx and n_times:
            outflow = derivs["u_right"] + self.diffusivity * derivs["ux_right"]  # (B, N, nt)
            lin_rows.append(outflow[:, :, times].transpose(1, 2))
            lin_target.append(basis.new_zeros((batch, n_times)))
        weight = basis.new_ones((batch,))
        if self.balance_rows and lin_rows:
            # Each group (initial, inlet, outflow) weighs as much as all PDE rows, as each is
            # a term of its own in the loss (pooled: the groups share one weight, as models
            # saved before). No PDE rows (all in the settling levels): nothing to weigh.
            plain = sum(t.abs().sum(-1) for t in lin_target)  # (B,)
            counts = [r.shape[1] for r in lin_rows]
            if not self.balance_each_group:  # one group of them all
                counts = [sum(counts)] * len(counts)
            for g, (group, aim) in enumerate(zip(lin_rows, lin_target, strict=True)):
                w = torch.where(pde_rows > 0, (pde_rows / counts[g]).sqrt(), 1.0)
                lin_rows[g], lin_target[g] = group * w[:, None, None], aim * w[:, None]
            # the targets' mean weight, by which the initial guess reads their level
            weighed = sum(t.abs().sum(-1) for t in lin_target)
            weight = torch.where(plain > 0, weighed / plain, weight)
        if lin_rows:
            lin = torch.cat(lin_rows, dim=1)  # (B, n_lin, N)
            target = torch.cat(lin_target, dim=1)  # (B, n_lin)
        else:
            lin = basis.new_zeros((batch, 0, n_basis))
            target = basis.new_zeros((batch, 0))
        constants = torch.cat(
            [self.constants(dtype, basis.device).expand(batch, -1), weight[:, None]], dim=-1
        )
        params = (*rows, lin, target, constants)
        return tuple(p.contiguous() for p in params)
