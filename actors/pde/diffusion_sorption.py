"""1-D diffusion-sorption (PDEBench) by finite volumes in space and BDF in time.

The equation is the Freundlich-sorption transport problem of PDEBench:

    u_t = D / R(u) * u_xx,      x in (0, 1),  t in (0, T]
    R(u) = 1 + ((1 - phi) / phi) * rho_s * k * n_f * u**(n_f - 1)

with u(0, t) = 1 and a Cauchy outflow condition at x = 1 (see below).

Why finite volumes on R(u) * u_t = D * u_xx: R(u) is dC/du for the total
(dissolved + sorbed) concentration C(u) = u + ((1 - phi) / phi) * rho_s * k * u**n_f,
so each cell's C changes only by the difference of the fluxes through its two
faces. The scheme therefore conserves total mass up to the boundary fluxes,
which is what the tests check for the nonlinear case.

Grid: nx cells of width dx = 1 / nx, unknowns at the centres x_i = (i + 0.5) dx.
Interior fluxes are -D (u_{i+1} - u_i) / dx. Boundary fluxes use values on the
boundary faces, half a cell from the first/last centre, solved from the
boundary conditions; this keeps the scheme second-order up to the boundary:

    left,  u(0) = 1:                  flux_in  = D * (1 - u_0) / (dx / 2)
    right, u(1) = -D * u_x(1):        u(1) = r / (1 + r) * u_{nx-1},  r = 2 D / dx
                                      flux_out = -D * u_x(1) = u(1)

Right boundary sign. The PDEBench paper writes the Cauchy condition as
u(1, t) = D * u_x(1, t), but its generator sets the ghost value to
D * (u_{nx-2} - u_{nx-1}) / dx, i.e. u(1) = -D * u_x(1): the outflow sign used
here. The written sign is not usable: with u_x(1) = u(1) / D the homogeneous
problem has a growing mode sinh(k x) with tanh(k) / k = D, k ~ 1 / D, growing
like exp(t / D) = exp(2000 t); its half-cell discretisation is singular at
dx = 2 D (1000 cells) and overflows at PDEBench's own 1024 cells. With the
outflow sign the outflowing flux equals the boundary value, as for a flushed
outlet, and the problem is well posed at every resolution.

Two further differences from PDEBench's generator: it places the boundary
values a whole cell (not half a cell) from the end centres, which is first
order at the boundaries; and it regularises the singular u**(n_f - 1) as
(u + 1e-6)**(n_f - 1). Here R is evaluated at max(u, 1e-6) instead: for
u >= 1e-6 R is then exactly dC/du (so mass balance is exact), and small negative
undershoots of the time integrator do not produce NaN from a fractional power.

Time integration: the system is stiff (diffusion eigenvalues ~ D / dx**2, and
R varies strongly near u = 0), so scipy's BDF is used with a tridiagonal
Jacobian sparsity pattern; the finite-difference Jacobian then costs three
right-hand-side evaluations, which keeps 1024 cells cheap.

Initial condition: PDEBench's paper states u(0, x) ~ U(0, 0.2); its generator
draws one value for all cells, which is the default of the preprocess spec
(`initial_condition: constant`); `per-cell` draws each cell independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy.integrate import solve_ivp

INLET_CONCENTRATION = 1.0  # u(0, t), PDEBench's solubility "sol"
SINGULARITY_GUARD = 1e-6  # R(u) is evaluated at max(u, this) because u**(n_f-1) blows up at 0


def cell_centres(nx: int) -> np.ndarray:
    """Cell centres x_i = (i + 0.5) / nx of nx equal cells on (0, 1) -> (nx,)."""
    if isinstance(nx, bool) or not isinstance(nx, (int, np.integer)) or nx < 2:
        raise ValueError(f"nx must be an integer >= 2, got {nx!r}")
    return (np.arange(nx) + 0.5) / nx


def random_initial_condition(
    rng: np.random.Generator,
    nx: int,
    low: float = 0.0,
    high: float = 0.2,
    per_cell: bool = True,
) -> np.ndarray:
    """Initial concentration u0 ~ U(low, high): independent per cell, or one value for the
    whole domain (`per_cell=False`, as PDEBench's generator draws it)."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy Generator, e.g. np.random.default_rng(seed)")
    if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low < high):
        raise ValueError(f"need finite 0 <= low < high, got low={low!r}, high={high!r}")
    cell_centres(nx)  # validates nx
    if not per_cell:
        return np.full(nx, rng.uniform(low, high))
    return rng.uniform(low, high, size=nx)


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")


@dataclass(frozen=True)
class DiffusionSorption:
    """Physical parameters (PDEBench defaults) and the solver for one sample."""

    diffusivity: float = 5e-4  # D
    porosity: float = 0.29  # phi
    bulk_density: float = 2880.0  # rho_s
    freundlich_k: float = 3.5e-4  # k
    freundlich_exponent: float = 0.874  # n_f

    def __post_init__(self) -> None:
        _positive("diffusivity", self.diffusivity)
        _positive("bulk_density", self.bulk_density, allow_zero=True)
        _positive("freundlich_k", self.freundlich_k, allow_zero=True)
        _positive("freundlich_exponent", self.freundlich_exponent)
        if not (np.isfinite(self.porosity) and 0.0 < self.porosity <= 1.0):
            raise ValueError(f"porosity must be in (0, 1], got {self.porosity!r}")

    @property
    def sorption_coefficient(self) -> float:
        """((1 - phi) / phi) * rho_s * k: sorbed concentration per u**n_f."""
        return (1.0 - self.porosity) / self.porosity * self.bulk_density * self.freundlich_k

    def retardation(self, u: np.ndarray) -> np.ndarray:
        """R(u) = 1 + ((1 - phi) / phi) rho_s k n_f max(u, 1e-6)**(n_f - 1)."""
        u = np.maximum(np.asarray(u, dtype=np.float64), SINGULARITY_GUARD)
        n_f = self.freundlich_exponent
        return 1.0 + self.sorption_coefficient * n_f * u ** (n_f - 1.0)

    def simulate(
        self, u0: np.ndarray, times: np.ndarray, rtol: float = 1e-6, atol: float = 1e-8
    ) -> np.ndarray:
        """u0 (nx,), times (nt,) increasing with times[0] == 0 -> u (nt, nx), float64.

        Raises RuntimeError if the integrator fails.
        """
        u0 = np.asarray(u0, dtype=np.float64)
        times = np.asarray(times, dtype=np.float64)
        if u0.ndim != 1 or u0.size < 2:
            raise ValueError(f"u0 must be a 1-D array of >= 2 cell values, got shape {u0.shape}")
        if not np.all(np.isfinite(u0)):
            raise ValueError("u0 contains NaN or inf; pass finite initial concentrations")
        if times.ndim != 1 or times.size < 1 or not np.all(np.isfinite(times)):
            raise ValueError("times must be a non-empty 1-D array of finite output times")
        if times[0] != 0.0:
            raise ValueError(f"times[0] must be 0 (the initial condition), got {times[0]!r}")
        if np.any(np.diff(times) <= 0):
            raise ValueError("times must be strictly increasing")
        _positive("rtol", rtol)
        _positive("atol", atol)
        if times.size == 1:
            return u0[None, :].copy()

        nx = u0.size
        dx = 1.0 / nx
        D = self.diffusivity
        r = 2.0 * D / dx
        outlet_gain = r / (1.0 + r)  # u(1) = outlet_gain * u_{nx-1}; also the outflow flux
        flux = np.empty(nx + 1)  # (nx + 1,) fluxes through the faces, positive towards +x

        def rhs(_t: float, u: np.ndarray) -> np.ndarray:
            flux[0] = 2.0 * D / dx * (INLET_CONCENTRATION - u[0])
            flux[1:-1] = D / dx * (u[:-1] - u[1:])
            flux[-1] = outlet_gain * u[-1]
            return (flux[:-1] - flux[1:]) / (dx * self.retardation(u))

        sparsity = scipy.sparse.diags(
            [1.0, 1.0, 1.0], [-1, 0, 1], shape=(nx, nx), format="csc", dtype=float
        )
        sol = solve_ivp(
            rhs,
            (times[0], times[-1]),
            u0,
            method="BDF",
            t_eval=times,
            rtol=rtol,
            atol=atol,
            jac_sparsity=sparsity,
        )
        if not sol.success or sol.y.shape[1] != times.size:
            raise RuntimeError(
                f"diffusion-sorption integration failed after t={sol.t[-1] if sol.t.size else 0}: "
                f"{sol.message}"
            )
        return np.ascontiguousarray(sol.y.T)  # (nt, nx)
