"""Derivatives of fields sampled on the data grid: finite differences and periodic FFTs.

Why derivatives on the global grid. The constrained models write u = sum_i omega_i b_i,
so every derivative of u is the same combination of the derivatives of the basis
functions b_i. Differentiating each b_i once, on the whole grid, by a linear stencil turns
"apply omega" into a matrix product; an expert then only gathers the rows of its
collocation points and never differentiates through the network. Autograd-in-the-input
derivatives (the usual PINN route) would need one backward pass per basis function and
per derivative, and would not match the resolution of the data the model is compared to.

Stencils (h the uniform spacing along the axis; all second order in h unless stated):

* first derivative (the time axis): central (f[i+1] - f[i-1]) / 2h inside; one-sided
  three-point (-3 f[0] + 4 f[1] - f[2]) / 2h and (3 f[n-1] - 4 f[n-2] + f[n-3]) / 2h at
  the two ends, so the derivative exists at t = 0 and t = T without a ghost point.
* second derivative: central (f[i-1] - 2 f[i] + f[i+1]) / h^2 inside; one-sided
  four-point (2 f[0] - 5 f[1] + 4 f[2] - f[3]) / h^2 at the ends (the three-point
  one-sided stencil would be first order only).
* boundary traces: the value or first derivative at a point that is not a node (a
  boundary face half a cell from the first cell centre) from the three nearest nodes by
  Lagrange interpolation: third order for the value, second order for the derivative.
  The stencils never use a boundary condition: the conditions are separate residual
  rows, so the derivatives stay linear (not affine) in the field.
* periodic axes: spectral derivatives by FFT, exact for the grid's band-limited
  interpolant; the Nyquist wavenumber of an even grid gets no first derivative (its
  sign is ambiguous), as in the data generator.

Every function here is built from slicing and concatenation (no in-place writes), so it
is differentiable and works on any leading shape, e.g. (B, N, nt, nx).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

UNIFORM_RTOL = 1e-6  # relative tolerance on the spacing of a grid the stencils accept


def grid_spacing(grids: Mapping[str, object], axis: str, n: int, min_points: int = 3) -> float:
    """Uniform spacing of grids[axis], which must have n strictly increasing points."""
    if axis not in grids:
        raise ValueError(f"grids: missing axis {axis!r} (have {sorted(grids)})")
    grid = np.asarray(
        grids[axis].detach().cpu() if isinstance(grids[axis], Tensor) else grids[axis],
        dtype=np.float64,
    )
    if grid.ndim != 1 or grid.size != n:
        raise ValueError(f"grids[{axis!r}]: expected {n} points, got shape {grid.shape}")
    if n < min_points:
        raise ValueError(f"grids[{axis!r}]: need at least {min_points} points, got {n}")
    if not np.all(np.isfinite(grid)):
        raise ValueError(f"grids[{axis!r}]: contains NaN or inf")
    steps = np.diff(grid)
    h = float(np.mean(steps))
    if not (h > 0 and np.all(np.abs(steps - h) <= UNIFORM_RTOL * h)):
        raise ValueError(f"grids[{axis!r}]: the stencils need a uniform, increasing grid")
    return h


def grid_values(grids: Mapping[str, object], axis: str) -> np.ndarray:
    """grids[axis] as a float64 numpy array (for stencil weights and coordinates)."""
    value = grids[axis]
    if isinstance(value, Tensor):
        value = value.detach().cpu()
    return np.asarray(value, dtype=np.float64)


def _axis(f: Tensor, axis: int) -> int:
    if not -f.ndim <= axis < f.ndim:
        raise ValueError(f"axis {axis} out of range for a {f.ndim}-D tensor")
    return axis % f.ndim


def first_derivative(f: Tensor, spacing: float, axis: int) -> Tensor:
    """df/ds along `axis`, second order everywhere (central inside, one-sided at ends)."""
    axis = _axis(f, axis)
    n = f.shape[axis]
    if n < 3:
        raise ValueError(f"first_derivative needs >= 3 points along axis {axis}, got {n}")

    def at(i: int, length: int = 1) -> Tensor:
        return f.narrow(axis, i, length)

    inside = (at(2, n - 2) - at(0, n - 2)) / (2.0 * spacing)
    start = (-3.0 * at(0) + 4.0 * at(1) - at(2)) / (2.0 * spacing)
    end = (3.0 * at(n - 1) - 4.0 * at(n - 2) + at(n - 3)) / (2.0 * spacing)
    return torch.cat([start, inside, end], dim=axis)


def second_derivative(f: Tensor, spacing: float, axis: int) -> Tensor:
    """d2f/ds2 along `axis`, second order everywhere (one-sided four-point at the ends)."""
    axis = _axis(f, axis)
    n = f.shape[axis]
    if n < 4:
        raise ValueError(f"second_derivative needs >= 4 points along axis {axis}, got {n}")

    def at(i: int, length: int = 1) -> Tensor:
        return f.narrow(axis, i, length)

    h2 = spacing * spacing
    inside = (at(0, n - 2) - 2.0 * at(1, n - 2) + at(2, n - 2)) / h2
    start = (2.0 * at(0) - 5.0 * at(1) + 4.0 * at(2) - at(3)) / h2
    end = (2.0 * at(n - 1) - 5.0 * at(n - 2) + 4.0 * at(n - 3) - at(n - 4)) / h2
    return torch.cat([start, inside, end], dim=axis)


def lagrange_weights(nodes: Sequence[float], at: float, derivative: int = 0) -> np.ndarray:
    """Weights w with sum_j w_j f(nodes_j) ~ f(at) (derivative=0) or f'(at) (derivative=1)."""
    nodes = np.asarray(nodes, dtype=np.float64)
    if derivative not in (0, 1):
        raise ValueError(f"derivative must be 0 or 1, got {derivative!r}")
    weights = np.empty(nodes.size)
    for j, xj in enumerate(nodes):
        others = np.delete(nodes, j)
        denominator = np.prod(xj - others)
        if derivative == 0:
            weights[j] = np.prod(at - others) / denominator
        else:  # d/dx prod_l (x - x_l) = sum_l prod_{l' != l} (x - x_l')
            weights[j] = (
                sum(np.prod(at - np.delete(others, i)) for i in range(others.size)) / denominator
            )
    return weights


def trace(f: Tensor, weights: Sequence[float], first: int, axis: int) -> Tensor:
    """sum_j weights[j] * f[first + j] along `axis` (that axis removed): a boundary trace."""
    axis = _axis(f, axis)
    out = 0.0
    for j, w in enumerate(weights):
        out = out + float(w) * f.select(axis, first + j)
    return out


def periodic_symbols(
    n: int,
    length: float,
    dtype: torch.dtype,
    device: torch.device | None = None,
    half: bool = False,
) -> tuple[Tensor, Tensor]:
    """For an FFT axis of n points on a period `length`: (i k with the Nyquist zeroed, -k^2),
    k = 2 pi m / length for the integer wavenumbers m in fftfreq order -> (n,), or in
    rfftfreq order -> (n // 2 + 1,) when `half` (the last axis of an rfftn)."""
    freq = torch.fft.rfftfreq if half else torch.fft.fftfreq
    m = freq(n, 1.0 / n, dtype=dtype, device=device)  # integer wavenumbers
    k = (2.0 * math.pi / length) * m
    ik = torch.complex(torch.zeros_like(k), torch.where(m.abs() == n / 2.0, 0.0 * k, k))
    return ik, -(k * k)
