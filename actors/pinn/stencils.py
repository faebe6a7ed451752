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

The finite-difference stencils and traces are linear maps along one axis, applied as a
list of shifted, weighted slices (`Stencil`): the forward adds each slice into one output
and the backward, the transposed list, into one gradient. Left to autograd, every slice of
the input would instead zero-fill a copy of the whole input in the backward (a dozen per
derivative of a (B, N, nt, nx) basis). They are differentiable to any order and work on
any leading shape.
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


# One term of a stencil: out[o : o + length] += weight * f[i : i + length] along the axis.
Term = tuple[int, int, int, float]  # (o, length, i, weight)


class Stencil(torch.autograd.Function):
    """apply(f, axis, out_length, terms) -> the linear map `terms` along `axis`.

    The output has `out_length` points along `axis`. The backward is the same map
    transposed (each term's o and i swapped, into the input's length), itself a Stencil,
    so higher derivatives work too."""

    @staticmethod
    def forward(ctx, f: Tensor, axis: int, out_length: int, terms: tuple[Term, ...]) -> Tensor:
        ctx.axis, ctx.in_length, ctx.terms = axis, f.shape[axis], terms
        return _apply_terms(f, axis, out_length, terms)

    @staticmethod
    def backward(ctx, grad: Tensor):
        transposed = tuple((i, length, o, w) for o, length, i, w in ctx.terms)
        return Stencil.apply(grad, ctx.axis, ctx.in_length, transposed), None, None, None


def _apply_terms(f: Tensor, axis: int, out_length: int, terms: tuple[Term, ...]) -> Tensor:
    shape = list(f.shape)
    shape[axis] = out_length
    out = f.new_zeros(shape)
    for o, length, i, weight in terms:
        out.narrow(axis, o, length).add_(f.narrow(axis, i, length), alpha=weight)
    return out


def first_derivative(f: Tensor, spacing: float, axis: int) -> Tensor:
    """df/ds along `axis`, second order everywhere (central inside, one-sided at ends)."""
    axis = _axis(f, axis)
    n = f.shape[axis]
    if n < 3:
        raise ValueError(f"first_derivative needs >= 3 points along axis {axis}, got {n}")
    c = 1.0 / (2.0 * spacing)
    terms = (
        (1, n - 2, 2, c), (1, n - 2, 0, -c),  # central inside
        (0, 1, 0, -3 * c), (0, 1, 1, 4 * c), (0, 1, 2, -c),  # one-sided at the start
        (n - 1, 1, n - 1, 3 * c), (n - 1, 1, n - 2, -4 * c), (n - 1, 1, n - 3, c),  # end
    )  # fmt: skip
    return Stencil.apply(f, axis, n, terms)


def second_derivative(f: Tensor, spacing: float, axis: int) -> Tensor:
    """d2f/ds2 along `axis`, second order everywhere (one-sided four-point at the ends)."""
    axis = _axis(f, axis)
    n = f.shape[axis]
    if n < 4:
        raise ValueError(f"second_derivative needs >= 4 points along axis {axis}, got {n}")
    c = 1.0 / (spacing * spacing)
    terms = (
        (1, n - 2, 0, c), (1, n - 2, 1, -2 * c), (1, n - 2, 2, c),  # central inside
        (0, 1, 0, 2 * c), (0, 1, 1, -5 * c), (0, 1, 2, 4 * c), (0, 1, 3, -c),  # start
        (n - 1, 1, n - 1, 2 * c), (n - 1, 1, n - 2, -5 * c), (n - 1, 1, n - 3, 4 * c),
        (n - 1, 1, n - 4, -c),  # end
    )  # fmt: skip
    return Stencil.apply(f, axis, n, terms)


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
    return traces(f, [(weights, first)], axis).squeeze(axis)


def traces(f: Tensor, stencils: Sequence[tuple[Sequence[float], int]], axis: int) -> Tensor:
    """Several traces at once, stacked along `axis`: stencils [(weights, first), ...] ->
    out with len(stencils) points on that axis. One pass over f, and one gradient."""
    axis = _axis(f, axis)
    terms = tuple(
        (j, 1, first + i, float(w))
        for j, (weights, first) in enumerate(stencils)
        for i, w in enumerate(weights)
    )
    return Stencil.apply(f, axis, len(stencils), terms)


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
