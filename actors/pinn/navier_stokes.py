"""The 2-D Navier-Stokes (vorticity) constraint: residuals for the experts, physics loss.

PDE on the periodic square, no forcing (axis order w[t, i, j] = w(t, x_i, y_j)):

    w_t + u w_x + v w_y = nu lap(w),   lap(psi) = -w,   u = psi_y,   v = -psi_x

Residual. The linear (not squared) residual r = w_t + u w_x + v w_y - nu lap(w), in
physical time: vorticity, velocity and their gradients are O(1) to O(10) for the data's
Gaussian random fields, so no rescaling is needed (t_end only scales the time input
channel of the network). A least-squares solve of the linear residual has the same
minimiser as the squared one when the residual can vanish, and its Jacobian is better
conditioned (the squared residual squares the condition number).

Derivatives (see `stencils`). Space is periodic, so x and y derivatives, the Laplacian
and the velocity are spectral (FFT), exact for the grid's band-limited field and the same
operators as the data generator; the period is n * spacing of each axis (1 for the data,
x_i = i / n). Time is not periodic: w_t by second-order central differences, one-sided
three-point at t = 0 and t = T. The residual therefore vanishes on an exact solution up to
an O(dt^2) time-discretisation error.

Bilinear in omega. Velocity is linear in the vorticity, so each basis function b_i gets
its own velocity (u_i, v_i) once, on the global grid. With w = B omega the residual at a
point is

    (W_t omega) + (U omega)(W_x omega) + (V omega)(W_y omega) - nu (L omega),

a quadratic form in omega: the only nonlinearity an expert's solve sees.

Expert k's residual (`navier_stokes_residual`, one sample) stacks the m PDE rows at its
collocation points, the initial rows w(0, x, y) - w0(x, y) at its t = 0 points (if its
block starts at t = 0) and ridge * omega. Periodicity is built into the derivatives, so
there are no boundary rows.

Physics loss: per sample RMS of the PDE residual over the full grid plus RMS of the
initial residual, mean over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from actors.constraint.residual import ClosedFormResidual, outer_rows, quadratic_form
from actors.pinn.model import assemble
from actors.pinn.partition import Partition
from actors.pinn.rows import check_points, gather_rows, rms
from actors.pinn.stencils import first_derivative, grid_spacing, grid_values, periodic_symbols

_ROW_KEYS = ("w_t", "w_x", "w_y", "lap", "u", "v")


def _residual(omega: Tensor, params: tuple[Tensor, ...]) -> Tensor:
    """One expert's residual for ONE sample: omega (N,) -> r (M,), M = m + n_ic + N.

    params = (wt_rows, wx_rows, wy_rows, lap_rows, u_rows, v_rows (m, N) each,
    ic_rows (n_ic, N), ic_target (n_ic,), constants (2,) = [nu, ridge]).
    Pure torch (vmap/jacfwd-safe): no in-place ops, no data-dependent control flow.
    """
    wt, wx, wy, lap, u, v, ic_rows, ic_target, constants = params
    viscosity, ridge = constants.unbind(-1)
    pde = (wt @ omega) + (u @ omega) * (wx @ omega) + (v @ omega) * (wy @ omega)
    pde = pde - viscosity * (lap @ omega)  # (m,)
    return torch.cat([pde, ic_rows @ omega - ic_target, ridge * omega])


def _linearize(omega: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Batched r (P, M) and J's row blocks in closed form: the product rule on the two
    bilinear terms, J_pde = W_t + (W_x w) U + (U w) W_x + (W_y w) V + (V w) W_y - nu L,
    accumulated in place into one (P, m, N) tensor."""
    wt, wx, wy, lap, u, v, ic_rows, ic_target, constants = params
    viscosity, ridge = (c[:, None] for c in constants.unbind(-1))
    w = omega.unsqueeze(-1)
    w_t, w_x, w_y, w_lap, w_u, w_v = ((rows @ w).squeeze(-1) for rows in (wt, wx, wy, lap, u, v))
    pde = w_t + w_u * w_x + w_v * w_y - viscosity * w_lap
    jac_pde = wt.addcmul(u, w_x.unsqueeze(-1))
    for rows, scale in ((wx, w_u), (v, w_y), (wy, w_v), (lap, -viscosity)):
        jac_pde.addcmul_(rows, scale.unsqueeze(-1))
    n = omega.shape[-1]
    eye = torch.eye(n, dtype=omega.dtype, device=omega.device)
    r = torch.cat([pde, (ic_rows @ w).squeeze(-1) - ic_target, ridge * omega], dim=-1)
    return r, (jac_pde, ic_rows, ridge.unsqueeze(-1) * eye)


def _curvature(omega: Tensor, params: tuple[Tensor, ...], r: Tensor) -> Tensor:
    """sum_i r_i Hess(r_i) = S + S^T with S = U^T diag(r) W_x + V^T diag(r) W_y."""
    _, wx, wy, _, u, v = params[:6]
    r_pde = r[:, : u.shape[1]]
    half = quadratic_form(u, r_pde, wx) + quadratic_form(v, r_pde, wy)
    return half + half.mT


def _pullback(omega: Tensor, params: tuple[Tensor, ...], lam: Tensor):
    """Cotangents of g = J^T r along lam, F = sum_i r_i s_i with s = J lam. With w_x = W_x
    omega, l_x = W_x lam (and so on), the bilinear term (U omega)(W_x omega) gives

        dF/dW_x = (s w_u + r l_u) omega + r w_u lam
        dF/dU   = (s w_x + r l_x) omega + r w_x lam

    (likewise V, W_y); dF/dW_t = s omega + r lam, dF/dL = -nu (s omega + r lam), and
    s omega + r lam, -s for the initial rows and their target."""
    wt, wx, wy, lap, u, v, ic_rows, ic_target, constants = params
    viscosity = constants[:, :1]
    w, q = omega.unsqueeze(-1), lam.unsqueeze(-1)
    mats = (wt, wx, wy, lap, u, v)
    w_t, w_x, w_y, w_lap, w_u, w_v = ((m @ w).squeeze(-1) for m in mats)
    l_t, l_x, l_y, l_lap, l_u, l_v = ((m @ q).squeeze(-1) for m in mats)
    r = w_t + w_u * w_x + w_v * w_y - viscosity * w_lap
    s = l_t + w_x * l_u + w_u * l_x + w_y * l_v + w_v * l_y - viscosity * l_lap
    r_ic = (ic_rows @ w).squeeze(-1) - ic_target
    s_ic = (ic_rows @ q).squeeze(-1)
    return (
        outer_rows(s, omega, r, lam),
        outer_rows(s * w_u + r * l_u, omega, r * w_u, lam),
        outer_rows(s * w_v + r * l_v, omega, r * w_v, lam),
        outer_rows(-viscosity * s, omega, -viscosity * r, lam),
        outer_rows(s * w_x + r * l_x, omega, r * w_x, lam),
        outer_rows(s * w_y + r * l_y, omega, r * w_y, lam),
        outer_rows(s_ic, omega, r_ic, lam),
        -s_ic,
        None,
    )


navier_stokes_residual = ClosedFormResidual(
    "navier_stokes_residual", _residual, _linearize, _curvature, _pullback
)


@dataclass(frozen=True)
class NavierStokesConstraint:
    """Viscosity, the time scale of the input channel and the experts' ridge."""

    viscosity: float = 1e-4
    t_end: float = 5.0
    ridge: float = 1e-4

    name: ClassVar[str] = "navier-stokes"
    field: ClassVar[str] = "vorticity"
    value_key: ClassVar[str] = "w"  # the solution itself among `derivatives`' fields
    axes: ClassVar[tuple[str, ...]] = ("t", "x", "y")
    periodic: ClassVar[tuple[bool, ...]] = (False, True, True)
    dims: ClassVar[int] = 3
    in_channels: ClassVar[int] = 4  # tau, x, y, w0
    residual_fn = navier_stokes_residual
    row_keys: ClassVar[tuple[str, ...]] = _ROW_KEYS

    def __post_init__(self) -> None:
        for name in ("viscosity", "ridge"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if not (np.isfinite(self.t_end) and self.t_end > 0):
            raise ValueError(f"t_end must be finite and > 0, got {self.t_end!r}")

    def grid_shape(self, grids) -> tuple[int, int, int]:
        """(nt, nx, ny) of grids["t"], grids["x"], grids["y"]."""
        for axis in self.axes:
            if axis not in grids:
                raise ValueError(f"grids: missing axis {axis!r} (have {sorted(grids)})")
        return len(grids["t"]), len(grids["x"]), len(grids["y"])

    def constants(self, dtype: torch.dtype, device=None) -> Tensor:
        """[nu, ridge] -> (2,)."""
        return torch.tensor([self.viscosity, self.ridge], dtype=dtype, device=device)

    # -- the network's side --------------------------------------------------------------

    def inputs(self, initial: Tensor, grids) -> Tensor:
        """initial (B, nx, ny) -> (B, 4, nt, nx, ny): tau = t / T, x, y, w0 broadcast over t."""
        nt, nx, ny = self.grid_shape(grids)
        if not isinstance(initial, Tensor) or initial.ndim != 3 or initial.shape[1:] != (nx, ny):
            shape = tuple(initial.shape) if isinstance(initial, Tensor) else type(initial)
            raise ValueError(f"initial must be (B, {nx}, {ny}), got {shape}")
        dtype, device = initial.dtype, initial.device
        t = torch.as_tensor(grid_values(grids, "t"), dtype=dtype, device=device) / self.t_end
        x = torch.as_tensor(grid_values(grids, "x"), dtype=dtype, device=device)
        y = torch.as_tensor(grid_values(grids, "y"), dtype=dtype, device=device)
        shape = (initial.shape[0], nt, nx, ny)
        return torch.stack(
            [
                t[None, :, None, None].expand(shape),
                x[None, None, :, None].expand(shape),
                y[None, None, None, :].expand(shape),
                initial[:, None].expand(shape),
            ],
            dim=1,
        )  # (B, 4, nt, nx, ny)

    def derivatives(self, basis: Tensor, grids) -> dict[str, Tensor]:
        """basis (B, N, nt, nx, ny) -> {"w", "w_t", "w_x", "w_y", "lap", "u", "v"}, each
        (B, N, nt, nx, ny); (u, v) is the velocity of each basis function on its own; and
        "w_start", the initial time level (B, N, nx, ny)."""
        if not isinstance(basis, Tensor) or basis.ndim != 5:
            raise ValueError("basis must be a (B, N, nt, nx, ny) tensor")
        nt, nx, ny = self.grid_shape(grids)
        if tuple(basis.shape[2:]) != (nt, nx, ny):
            raise ValueError(f"basis grid {tuple(basis.shape[2:])} != grids {(nt, nx, ny)}")
        dt = grid_spacing(grids, "t", nt, min_points=3)
        dx = grid_spacing(grids, "x", nx, min_points=4)
        dy = grid_spacing(grids, "y", ny, min_points=4)
        real = basis.dtype
        ikx, kx2 = periodic_symbols(nx, nx * dx, real, basis.device)
        iky, ky2 = periodic_symbols(ny, ny * dy, real, basis.device, half=True)
        ikx, kx2 = ikx[:, None], kx2[:, None]  # (nx, 1)
        laplacian = kx2 + ky2[None, :]  # (nx, ny // 2 + 1): the symbol -|k|^2 of lap
        safe = torch.where(laplacian < 0, laplacian, -1.0)
        inverse = torch.where(laplacian < 0, -1.0 / safe, 0.0)  # 1 / |k|^2, 0 at k = 0
        spectrum = torch.fft.rfft2(basis)  # (B, N, nt, nx, ny // 2 + 1)
        psi = spectrum * inverse  # lap(psi) = -w; the mean (k = 0) carries no velocity

        def back(s: Tensor) -> Tensor:
            return torch.fft.irfft2(s, s=(nx, ny))

        return {
            "w": basis,
            "w_start": basis.select(-3, 0),  # (B, N, nx, ny): t = 0, cut once for every expert
            "w_t": first_derivative(basis, dt, axis=-3),
            "w_x": back(ikx * spectrum),
            "w_y": back(iky * spectrum),
            "lap": back(laplacian * spectrum),
            "u": back(iky * psi),
            "v": back(-ikx * psi),
        }

    def pde_residual(self, d: dict[str, Tensor]) -> Tensor:
        """w_t + u w_x + v w_y - nu lap(w) from a derivatives dict, elementwise."""
        return d["w_t"] + d["u"] * d["w_x"] + d["v"] * d["w_y"] - self.viscosity * d["lap"]

    def residual_field(self, w: Tensor, grids) -> Tensor:
        """w (B, nt, nx, ny) -> PDE residual on the full grid (B, nt, nx, ny)."""
        if not isinstance(w, Tensor) or w.ndim != 4:
            raise ValueError("w must be a (B, nt, nx, ny) tensor")
        return self.pde_residual(self.derivatives(w[:, None], grids))[:, 0]

    def physics_loss(self, w: Tensor, initial: Tensor, grids) -> Tensor:
        """Mean over the batch of RMS(PDE residual) + RMS(w(0) - w0), with the derivatives
        of w itself (PI-SC, and any w on the grid)."""
        if not isinstance(w, Tensor) or w.ndim != 4:
            raise ValueError("w must be a (B, nt, nx, ny) tensor")
        d = self.derivatives(w[:, None], grids)
        return self.fields_loss({k: v[:, 0] for k, v in d.items()}, initial)

    def assembled_fields(
        self,
        derivs: dict[str, Tensor],
        omegas: list[Tensor],
        partition: Partition,
        grids=None,
    ) -> dict[str, Tensor]:
        """Every field as b·ω_k inside each sub-domain: the spectral derivatives of the
        basis, not of the assembled w, whose jumps between experts would ring globally."""
        return {k: assemble(v, omegas, partition) for k, v in derivs.items() if k != "w_start"}

    def fields_loss(self, fields: dict[str, Tensor], initial: Tensor) -> Tensor:
        """The loss from w's fields (each (B, nt, nx, ny))."""
        w = fields["w"]
        if not isinstance(initial, Tensor) or tuple(initial.shape) != (w.shape[0], *w.shape[2:]):
            raise ValueError(f"initial must be {(w.shape[0], *w.shape[2:])} to match w")
        pde = self.pde_residual(fields)  # (B, nt, nx, ny)
        initial_r = w[:, 0] - initial.to(w.dtype)  # (B, nx, ny)
        return (rms(pde, (1, 2, 3)) + rms(initial_r, (1, 2))).mean()

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
        (wt, wx, wy, lap, u, v rows (B, m, N) each, ic_rows (B, n_ic, N), ic_target
        (B, n_ic), constants (B, 2)) for `navier_stokes_residual`.

        Row gathers of `derivs`: differentiable w.r.t. the basis when it requires grad, so
        the implicit backward's gradient w.r.t. these tensors reaches the network. Detach
        them to ship them to an expert."""
        basis = derivs["w"]
        batch, n_basis, nt, nx, ny = basis.shape
        if tuple(partition.grid_shape) != (nt, nx, ny):
            raise ValueError(f"partition grid {partition.grid_shape} != basis grid {(nt, nx, ny)}")
        if not isinstance(initial, Tensor) or tuple(initial.shape) != (batch, nx, ny):
            raise ValueError(f"initial must be ({batch}, {nx}, {ny})")
        points = check_points(points, batch, nt * nx * ny).to(basis.device)
        st, sx, sy = partition.slices(k)
        dtype = basis.dtype
        if rows is None:
            rows = {key: gather_rows(derivs[key], points) for key in _ROW_KEYS}
        rows = [rows[key] for key in _ROW_KEYS]
        if st.start == 0:
            ic = derivs["w_start"][:, :, sx, sy].reshape(batch, n_basis, -1).transpose(1, 2)
            target = initial[:, sx, sy].reshape(batch, -1).to(basis.device, dtype)
        else:
            ic = basis.new_zeros((batch, 0, n_basis))
            target = basis.new_zeros((batch, 0))
        constants = self.constants(dtype, basis.device).expand(batch, -1)
        params = (*rows, ic, target, constants)
        return tuple(p.contiguous() for p in params)
