"""Fourier neural operator on a space-time grid (Li et al., ICLR 2021), 1-, 2- or 3-D.

The shared network f_theta of PI-SC, PI-HC and PI-HC-MoE. It maps the input channels
(grid coordinates and the initial condition broadcast over time) to C_out channels on
the same grid:

    lift (pointwise linear, C_in -> width)
    `layers` x [ spectral conv + pointwise linear, GELU after all but the last ]
    project (pointwise linear width -> 2 width, GELU, linear -> C_out)

Spectral convolution. rfftn over the grid axes, multiply the retained low modes by a
learned complex matrix per mode (width x width), zero every other mode, irfftn back. Only
the retained modes are ever computed: each transform is a product with the kept rows of
the DFT matrix, cheaper than FFTs of every mode when few are kept (the usual case).
Retained modes: wavenumbers |k| < modes along each full-FFT axis (2 modes - 1 of them)
and 0 <= k < modes along the last (half-spectrum) axis. Keeping a set symmetric in k
means a real weight maps a real field to the real field with the high modes removed; the
original FNO keeps k = -modes as well, which has no partner +modes. When an axis is too
short for `modes`, the kept set shrinks to the wavenumbers the axis resolves without its
Nyquist mode (|k| < (n + 1) // 2), so any grid size works.

Non-periodic axes. The FFT treats every axis as periodic, which would tie t = T to t = 0
(and, for the diffusion-sorption x axis, the inlet to the outlet). As in the FNO papers
for non-periodic dimensions, the lifted field is zero-padded at the end of such an axis
before the Fourier layers and cropped back before the projection, so the periodic
extension has room to return to zero instead of distorting the boundaries. `padding` is
an int (points added to the time axis, axis 0, only) or one count per grid axis
(0 for a periodic axis).

Weights are stored as real tensors with a trailing (real, imag) axis, so `.double()`
turns the whole network to float64 (complex parameters would stay complex64).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _kept(n: int, modes: int) -> int:
    """How many non-negative wavenumbers are kept on an axis of n points."""
    return min(modes, (n + 1) // 2)


class SpectralConv(nn.Module):
    """One Fourier layer's global convolution: (B, C_in, *grid) -> (B, C_out, *grid)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, modes: int):
        super().__init__()
        self.dims = _positive_int("dims", dims)
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.modes = _positive_int("modes", modes)
        # (C_in, C_out, 2m-1, ..., 2m-1, m, 2): full-FFT axes hold k = 0..m-1 then -(m-1)..-1
        shape = (in_channels, out_channels, *([2 * modes - 1] * (dims - 1)), modes, 2)
        scale = 1.0 / (in_channels * out_channels)
        self.weight = nn.Parameter(scale * torch.rand(shape))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 + self.dims or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must be (B, {self.in_channels}, {self.dims} grid axes), got {tuple(x.shape)}"
            )
        grid = tuple(x.shape[2:])
        m, last = self.modes, 1 + self.dims
        weight = torch.view_as_complex(self.weight)  # (C_in, C_out, 2m-1, ..., m)
        # the kept modes of x: the last (half-spectrum) axis by two real products, then
        # each full axis by a complex one
        q_last = _kept(grid[-1], m)
        pairs = _matmul(x, _forward_last(grid[-1], q_last, x.dtype, x.device))  # (..., 2 q)
        block = torch.view_as_complex(pairs.unflatten(-1, (q_last, 2)))  # (..., q_last)
        for a in range(self.dims - 1):
            q = _kept(grid[a], m)
            block = _along(block, 2 + a, _forward_full(grid[a], q, block.dtype, x.device))
            weight = torch.cat(
                [weight.narrow(2 + a, 0, q), weight.narrow(2 + a, 2 * m - 1 - (q - 1), q - 1)],
                2 + a,
            )
        weight = weight.narrow(last, 0, q_last)
        mixed = torch.einsum("bi...,io...->bo...", block, weight)  # (B, C_out, kept modes)
        # back: each full axis, then the real part of the half-spectrum sum
        for a in range(self.dims - 1):
            q = _kept(grid[a], m)
            mixed = _along(mixed, 2 + a, _inverse_full(grid[a], q, mixed.dtype, x.device))
        pairs = torch.view_as_real(mixed.contiguous()).flatten(-2)  # (..., 2 q_last)
        return _matmul(pairs, _inverse_last(grid[-1], q_last, x.dtype, x.device))


# The spectral convolution keeps a few modes of grids of a few hundred points: its
# transforms are products with the few rows of the DFT matrix that are kept (O(n q) per
# line instead of the FFT's O(n log n) over every mode, and no zero-filled spectrum).
# Same conventions as rfftn / irfftn: the forward unscaled, the inverse divided by n.


def _matmul(x: Tensor, matrix: Tensor) -> Tensor:
    """x (..., n_in) @ matrix (n_in, n_out) as one 2-D product of a contiguous x (a batched
    product over strided views is many times slower, for complex numbers most of all)."""
    lead = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]) @ matrix).reshape(*lead, matrix.shape[-1])


def _along(x: Tensor, axis: int, matrix: Tensor) -> Tensor:
    """Apply `matrix` (n_in, n_out) along `axis` of x."""
    return _matmul(x.movedim(axis, -1), matrix).movedim(-1, axis)


def _full_wavenumbers(q: int) -> Tensor:
    """k = 0..q-1 then -(q-1)..-1: the kept modes of a full (complex) FFT axis."""
    return torch.cat([torch.arange(q), torch.arange(-(q - 1), 0)]).to(torch.float64)


@functools.lru_cache(maxsize=64)
def _forward_last(n: int, q: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(n, 2q): columns cos, -sin of 2 pi k i / n interleaved per k, so that x @ it is the
    real and imaginary parts of rfft(x)[:q] side by side (`view_as_complex` order)."""
    angle = 2 * math.pi * torch.outer(torch.arange(n, dtype=torch.float64), torch.arange(q)) / n
    return torch.stack([angle.cos(), -angle.sin()], dim=-1).flatten(-2).to(device, dtype)


@functools.lru_cache(maxsize=64)
def _inverse_last(n: int, q: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2q, n) with [Re X, Im X] interleaved per k @ it = Re(sum_k c_k X_k e^{2 pi i k j / n})
    / n, the irfft of the q kept modes: mode 0 once, the others twice (their conjugates
    are the dropped half)."""
    angle = 2 * math.pi * torch.outer(torch.arange(q, dtype=torch.float64), torch.arange(n)) / n
    weight = torch.full((q, 1), 2.0 / n, dtype=torch.float64)
    weight[0] = 1.0 / n
    rows = torch.stack([weight * angle.cos(), -weight * angle.sin()], dim=1)  # (q, 2, n)
    return rows.flatten(0, 1).to(device, dtype)


@functools.lru_cache(maxsize=64)
def _forward_full(n: int, q: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """exp(-2 pi i k j / n) for j < n and the kept k -> (n, 2q - 1) complex."""
    angle = -2 * math.pi * torch.outer(torch.arange(n, dtype=torch.float64), _full_wavenumbers(q))
    return torch.polar(torch.ones_like(angle), angle / n).to(device, dtype)


@functools.lru_cache(maxsize=64)
def _inverse_full(n: int, q: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """exp(2 pi i k j / n) / n for the kept k and j < n -> (2q - 1, n) complex."""
    angle = 2 * math.pi * torch.outer(_full_wavenumbers(q), torch.arange(n, dtype=torch.float64))
    return torch.polar(torch.full_like(angle, 1.0 / n), angle / n).to(device, dtype)


class Pointwise(nn.Module):
    """Pointwise linear map C_in -> C_out at every grid point: a 1x1 convolution with
    nn.ConvNd's parameters (names, shapes, initialisation), computed as one batched matrix
    product, which on CPU is 3-4x faster than the convolution kernels forward and backward."""

    def __init__(self, dims: int, in_channels: int, out_channels: int):
        super().__init__()
        conv = _CONVS[dims](in_channels, out_channels, 1)
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, *grid) -> (B, C_out, *grid)
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        weight = self.weight.reshape(-1, c).expand(b, -1, -1)
        bias = self.bias.reshape(1, -1, 1).expand(b, -1, flat.shape[2])
        return torch.baddbmm(bias, weight, flat).reshape(b, -1, *x.shape[2:])


class FNO(nn.Module):
    """(B, in_channels, *grid) -> (B, out_channels, *grid) on a `dims`-D grid."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        width: int = 64,
        modes: int = 8,
        layers: int = 5,
        padding: int | Sequence[int] = 6,
    ):
        super().__init__()
        if dims not in _CONVS:
            raise ValueError(f"dims must be 1, 2 or 3 (grid axes incl. time), got {dims!r}")
        self.dims = dims
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        _positive_int("width", width)
        _positive_int("modes", modes)
        _positive_int("layers", layers)
        if isinstance(padding, int) and not isinstance(padding, bool):
            pads = (padding,) + (0,) * (dims - 1)
        else:
            try:
                pads = tuple(padding)
            except TypeError:
                msg = f"padding must be an int or {dims} ints, got {padding!r}"
                raise ValueError(msg) from None
        if len(pads) != dims or any(
            isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in pads
        ):
            raise ValueError(f"padding must be an int >= 0 or {dims} such ints, got {padding!r}")
        self.padding = pads
        self.lift = Pointwise(dims, in_channels, width)
        self.spectral = nn.ModuleList(
            SpectralConv(dims, width, width, modes) for _ in range(layers)
        )
        self.pointwise = nn.ModuleList(Pointwise(dims, width, width) for _ in range(layers))
        self.project = nn.Sequential(
            Pointwise(dims, width, 2 * width), nn.GELU(), Pointwise(dims, 2 * width, out_channels)
        )

    def kept_modes(
        self, grid: Sequence[int], padding: Sequence[int] | None = None
    ) -> tuple[int, ...]:
        """The non-negative wavenumbers the spectral layers keep along each axis of `grid`
        (padded as `forward` pads it, or by `padding`): equal on two grids, the same weights
        act on the same modes of both."""
        modes = self.spectral[0].modes
        pads = self.padding if padding is None else padding
        return tuple(_kept(n + p, modes) for n, p in zip(grid, pads, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 + self.dims or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must be (B, {self.in_channels}, {self.dims} grid axes), got {tuple(x.shape)}"
            )
        grid = tuple(x.shape[2:])
        h = self.lift(x)  # (B, width, *grid)
        # F.pad lists (before, after) pairs from the last axis backwards
        pad = [v for p in reversed(self.padding) for v in (0, p)]
        h = F.pad(h, pad)  # (B, width, *padded grid)
        for i, (spectral, pointwise) in enumerate(zip(self.spectral, self.pointwise, strict=True)):
            h = spectral(h) + pointwise(h)
            if i < len(self.spectral) - 1:
                h = F.gelu(h)
        h = h[(slice(None), slice(None), *(slice(0, n) for n in grid))]  # crop the padding
        return self.project(h)  # (B, out_channels, *grid)
