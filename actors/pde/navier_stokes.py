"""2-D incompressible Navier-Stokes in vorticity form, pseudo-spectral, periodic.

    w_t + u . grad(w) = nu * lap(w)     on the periodic unit square, no forcing
    lap(psi) = -w,   u = d(psi)/dy,   v = -d(psi)/dx

Arrays are indexed w[i, j] = w(x_i, y_j) with x_i = i / n, y_j = j / n: axis 0 is
x and axis 1 is y, as in the FNO data generator. Spectral fields are numpy rfft2
half-spectra of shape (n, n // 2 + 1); wavenumbers are integers, and every
derivative carries the 2*pi of the unit-length period.

Why each piece:

* Velocity from the stream function in Fourier space is exact for the grid
  field and automatically divergence-free. The mean of w (k = 0) carries no
  velocity and is left untouched. Derivatives of the Nyquist wavenumber are
  set to zero because its sign is ambiguous on an even grid.
* The product u . grad(w) is formed on the grid and its spectrum truncated to
  |k_x|, |k_y| < n / 3 (2/3 rule): quadratic products of the kept modes then
  alias only into discarded modes, so the kept modes evolve as an exact
  Galerkin truncation, which conserves energy and enstrophy when nu = 0.
* Time stepping is second-order IMEX: every stage is a Crank-Nicolson substep
  of c * dt from w on the (stiff, diagonal) viscous term, with the advection
  term taken from the previous stage; with B(h) = 1 + h nu |k|^2 / 2 and
  A(h) = 1 - h nu |k|^2 / 2 (|k| in radians per unit length):
      w1 = (A(dt/2) w + dt/2 N(w))  / B(dt/2)
      w2 = (A(dt/2) w + dt/2 N(w1)) / B(dt/2)
      w' = (A(dt)   w + dt   N(w2)) / B(dt)
  The last stage is trapezoidal in the viscous term and midpoint in
  advection (w2 approximates w(t + dt/2) to O(dt^2)), hence second order. The
  extra first stage is there for stability: the explicit part's amplification
  is 1 + z + z^2/2 + z^3/4, which stays <= 1 on the imaginary axis for
  |z| <= 2, whereas Heun's 1 + z + z^2/2 exceeds 1 for every imaginary z.
  With Heun + CN at cfl = 0.5, an inviscid 64^2 run (GRF x 20) had its
  enstrophy grow 88-fold by t = 10; this scheme at the same cfl damps the
  grid-scale modes instead, for 3 instead of 2 advection evaluations a step.
  CN keeps the viscously damped modes stable for any dt, so the step is
  limited by advection only.
* dt = cfl * dx / max|u| is re-evaluated every step from the velocity already
  computed for N(w), capped by max_dt, and the remaining interval to the next
  output time is split into equal steps, so outputs land exactly on the
  requested times without a tiny final step.

Initial vorticity: `gaussian_random_field` follows the FNO generator
(GaussianRF, dim 2): Fourier coefficients are complex normals (real and
imaginary parts each of variance 1/2, like torch.randn with a complex dtype)
scaled by n^2 sqrt(2) sigma (4 pi^2 |k|^2 + tau^2)^(-alpha/2), with
sigma = tau^(alpha - 1) (= tau^(0.5 (2 alpha - d)) for d = 2) and the k = 0
coefficient zeroed, followed by the real part of the inverse FFT. Hence the
field has zero mean and pointwise variance
sigma^2 * sum_{k != 0} (4 pi^2 |k|^2 + tau^2)^(-alpha).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np

# Substep fractions of the three-stage scheme: explicit stability polynomial
# 1 + z + z^2/2 + z^3/4, second order, stable on the imaginary axis for |z| <= 2.
STAGE_FRACTIONS = (0.5, 0.5, 1.0)


class _Operators(NamedTuple):
    """Spectral symbols for one grid size n, all broadcastable to (n, n // 2 + 1)."""

    laplacian: np.ndarray  # (n, m): (2 pi)^2 |k|^2 for integer k, minus the symbol of lap
    inverse_laplacian: np.ndarray  # (n, m): 1 / laplacian, 0 at k = 0 (psi_h = w_h * this)
    ddx: np.ndarray  # (n, 1): 2 pi i k_x, Nyquist zeroed
    ddy: np.ndarray  # (1, m): 2 pi i k_y, Nyquist zeroed
    dealias: np.ndarray  # (n, m): 1.0 where |k_x|, |k_y| < n / 3, else 0.0


@lru_cache(maxsize=8)
def _operators(n: int) -> _Operators:
    kx = np.fft.fftfreq(n, 1.0 / n)[:, None]  # (n, 1) integer wavenumbers along x
    ky = np.fft.rfftfreq(n, 1.0 / n)[None, :]  # (1, m)
    laplacian = (2.0 * np.pi) ** 2 * (kx**2 + ky**2)
    inverse_laplacian = np.zeros_like(laplacian)
    np.divide(1.0, laplacian, out=inverse_laplacian, where=laplacian > 0)
    nyquist = n / 2.0
    ddx = np.where(np.abs(kx) == nyquist, 0.0, 2j * np.pi * kx)
    ddy = np.where(np.abs(ky) == nyquist, 0.0, 2j * np.pi * ky)
    dealias = ((np.abs(kx) < n / 3.0) & (np.abs(ky) < n / 3.0)).astype(np.float64)
    ops = _Operators(laplacian, inverse_laplacian, ddx, ddy, dealias)
    for array in ops:
        array.setflags(write=False)  # shared through the cache
    return ops


def _check_field(w: np.ndarray, name: str = "w") -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 4:
        raise ValueError(f"{name} must be a square (n, n) array with n >= 4, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} contains NaN or inf; pass a finite vorticity field")
    return w


def gaussian_random_field(
    rng: np.random.Generator, n: int, alpha: float = 2.5, tau: float = 7.0
) -> np.ndarray:
    """Zero-mean periodic Gaussian random field on an n x n grid (FNO's GaussianRF) -> (n, n)."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy Generator, e.g. np.random.default_rng(seed)")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 4:
        raise ValueError(f"n must be an integer >= 4, got {n!r}")
    if not (np.isfinite(alpha) and alpha > 1.0):
        raise ValueError(f"alpha must be finite and > 1 (d/2) for a finite variance, got {alpha!r}")
    if not (np.isfinite(tau) and tau > 0.0):
        raise ValueError(f"tau must be finite and > 0, got {tau!r}")
    sigma = tau ** (0.5 * (2.0 * alpha - 2.0))
    k = np.fft.fftfreq(n, 1.0 / n)
    k2 = k[:, None] ** 2 + k[None, :] ** 2  # (n, n)
    sqrt_eig = n**2 * math.sqrt(2.0) * sigma * (4.0 * np.pi**2 * k2 + tau**2) ** (-alpha / 2.0)
    sqrt_eig[0, 0] = 0.0
    # complex normal, real and imaginary parts each of variance 1/2 (torch.randn, cfloat)
    coeff = (rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))) / math.sqrt(2.0)
    return np.fft.ifft2(sqrt_eig * coeff).real


def _velocity_hat(w_h: np.ndarray, ops: _Operators) -> tuple[np.ndarray, np.ndarray]:
    psi_h = w_h * ops.inverse_laplacian
    return ops.ddy * psi_h, -ops.ddx * psi_h


def velocity(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Velocity (u, v) = (d psi/dy, -d psi/dx) with lap(psi) = -w -> two (n, n) arrays."""
    w = _check_field(w)
    n = w.shape[0]
    u_h, v_h = _velocity_hat(np.fft.rfft2(w), _operators(n))
    return np.fft.irfft2(u_h, s=(n, n)), np.fft.irfft2(v_h, s=(n, n))


def kinetic_energy(w: np.ndarray) -> float:
    """E = 1/2 mean(u^2 + v^2); for nu > 0, dE/dt = -2 nu Z."""
    u, v = velocity(w)
    return 0.5 * float(np.mean(u * u + v * v))


def enstrophy(w: np.ndarray) -> float:
    """Z = 1/2 mean(w^2)."""
    w = _check_field(w)
    return 0.5 * float(np.mean(w * w))


class _Advection:
    """Evaluates N(w) = -dealias(u . grad w) and max|u| with reusable buffers."""

    def __init__(self, n: int, ops: _Operators):
        self.n = n
        self.ops = ops
        self.spectra = np.empty((4, n, n // 2 + 1), dtype=np.complex128)  # u, v, w_x, w_y

    def __call__(self, w_h: np.ndarray) -> tuple[np.ndarray, float]:
        ops, spectra = self.ops, self.spectra
        psi_h = w_h * ops.inverse_laplacian
        np.multiply(ops.ddy, psi_h, out=spectra[0])
        np.multiply(ops.ddx, psi_h, out=spectra[1])
        np.negative(spectra[1], out=spectra[1])
        np.multiply(ops.ddx, w_h, out=spectra[2])
        np.multiply(ops.ddy, w_h, out=spectra[3])
        u, v, w_x, w_y = np.fft.irfft2(spectra, s=(self.n, self.n))  # (4, n, n)
        speed = math.sqrt(float(np.max(u * u + v * v)))
        advection_h = np.fft.rfft2(u * w_x + v * w_y)
        advection_h *= ops.dealias
        np.negative(advection_h, out=advection_h)
        return advection_h, speed


def _step(
    w_h: np.ndarray,
    n_now: np.ndarray,
    dt: float,
    nu_laplacian: np.ndarray,
    advection: _Advection,
) -> np.ndarray:
    """One step: each stage is a Crank-Nicolson substep of c * dt from w_h, c = 1/2, 1/2, 1."""
    stage_h, n_stage = w_h, n_now  # N(w_h) is already known from the dt choice
    for i, fraction in enumerate(STAGE_FRACTIONS):
        if i > 0:
            n_stage, _ = advection(stage_h)
        h = fraction * dt
        half_viscous = (0.5 * h) * nu_laplacian  # (n, m)
        stage_h = ((1.0 - half_viscous) * w_h + h * n_stage) / (1.0 + half_viscous)
    return stage_h


def simulate(
    w0: np.ndarray,
    times: np.ndarray,
    viscosity: float = 1e-4,
    cfl: float = 0.5,
    max_dt: float | None = None,
) -> np.ndarray:
    """w0 (n, n), times (nt,) increasing, times[0] == 0 -> w (nt, n, n) float64, w[0] == w0.

    Raises RuntimeError (naming the time) if the solution becomes non-finite.
    """
    w0 = _check_field(w0, "w0")
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 1 or times.size < 1 or not np.all(np.isfinite(times)):
        raise ValueError("times must be a non-empty 1-D array of finite output times")
    if times[0] != 0.0:
        raise ValueError(f"times[0] must be 0 (the initial condition), got {times[0]!r}")
    if np.any(np.diff(times) <= 0):
        raise ValueError("times must be strictly increasing")
    if not (np.isfinite(viscosity) and viscosity >= 0.0):
        raise ValueError(f"viscosity must be finite and >= 0, got {viscosity!r}")
    if not (np.isfinite(cfl) and cfl > 0.0):
        raise ValueError(f"cfl must be finite and > 0, got {cfl!r}")
    if max_dt is not None and not (np.isfinite(max_dt) and max_dt > 0.0):
        raise ValueError(f"max_dt must be None or finite and > 0, got {max_dt!r}")

    # overflow is reported as RuntimeError naming the time, not as numpy warnings
    with np.errstate(over="ignore", invalid="ignore"):
        return _march(w0, times, float(viscosity), float(cfl), max_dt)


def _march(
    w0: np.ndarray, times: np.ndarray, viscosity: float, cfl: float, max_dt: float | None
) -> np.ndarray:
    n = w0.shape[0]
    ops = _operators(n)
    advection = _Advection(n, ops)
    dx = 1.0 / n
    dt_cap = math.inf if max_dt is None else float(max_dt)
    nu_laplacian = viscosity * ops.laplacian  # (n, m)

    out = np.empty((times.size, n, n))  # (nt, n, n)
    out[0] = w0
    w_h = np.fft.rfft2(w0)  # (n, m)
    t = 0.0
    for j in range(1, times.size):
        t_next = float(times[j])
        while t < t_next:
            n_now, speed = advection(w_h)
            if not math.isfinite(speed):
                raise RuntimeError(f"Navier-Stokes solution became non-finite at t={t:.6g}")
            dt = min(cfl * dx / speed if speed > 0 else math.inf, dt_cap)
            remaining = t_next - t
            # the 1e-9 slack stops round-off in remaining / dt from adding a step
            steps = max(1, math.ceil(remaining / dt - 1e-9))
            dt = remaining / steps
            w_h = _step(w_h, n_now, dt, nu_laplacian, advection)
            t = t_next if steps == 1 else t + dt
        out[j] = np.fft.irfft2(w_h, s=(n, n))
        if not np.all(np.isfinite(out[j])):
            raise RuntimeError(f"Navier-Stokes solution became non-finite by t={t_next:.6g}")
    return out
