"""Fourier neural operator on a space-time grid (Li et al., ICLR 2021), 1-, 2- or 3-D.

The shared network f_theta of PI-SC, PI-HC and PI-HC-MoE. It maps the input channels
(grid coordinates and the initial condition broadcast over time) to C_out channels on
the same grid:

    lift (pointwise linear, C_in -> width)
    `layers` x [ spectral conv + pointwise linear, GELU after all but the last ]
    project (pointwise linear width -> 2 width, GELU, linear -> C_out)

Spectral convolution. rfftn over the grid axes, multiply the retained low modes by a
learned complex matrix per mode (width x width), zero every other mode, irfftn back.
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
        axes = tuple(range(2, 2 + self.dims))
        spectrum = torch.fft.rfftn(x, dim=axes)  # (B, C_in, n_1, ..., n_d // 2 + 1)
        weight = torch.view_as_complex(self.weight)  # (C_in, C_out, 2m-1, ..., m)
        m = self.modes
        block = spectrum
        for a in range(self.dims - 1):  # full-FFT axes: k = 0..q-1 and -(q-1)..-1
            q = _kept(grid[a], m)
            n = grid[a]
            block = torch.cat(
                [block.narrow(2 + a, 0, q), block.narrow(2 + a, n - (q - 1), q - 1)], 2 + a
            )
            weight = torch.cat(
                [weight.narrow(2 + a, 0, q), weight.narrow(2 + a, 2 * m - 1 - (q - 1), q - 1)],
                2 + a,
            )
        q_last = _kept(grid[-1], m)
        block = block.narrow(-1, 0, q_last)
        weight = weight.narrow(-1, 0, q_last)
        mixed = torch.einsum("bi...,io...->bo...", block, weight)  # (B, C_out, kept modes)

        # scatter the kept modes back into an otherwise zero spectrum
        def zeros(axis: int, count: int) -> Tensor:
            shape = list(mixed.shape)
            shape[axis] = count
            return mixed.new_zeros(shape)

        last = grid[-1] // 2 + 1
        mixed = torch.cat([mixed, zeros(-1, last - q_last)], -1)
        for a in range(self.dims - 1):
            q, n = _kept(grid[a], m), grid[a]
            mixed = torch.cat(
                [
                    mixed.narrow(2 + a, 0, q),
                    zeros(2 + a, n - 2 * q + 1),
                    mixed.narrow(2 + a, q, q - 1),
                ],
                2 + a,
            )
        return torch.fft.irfftn(mixed, s=grid, dim=axes)  # (B, C_out, *grid)


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
        conv = _CONVS[dims]
        self.lift = conv(in_channels, width, 1)
        self.spectral = nn.ModuleList(
            SpectralConv(dims, width, width, modes) for _ in range(layers)
        )
        self.pointwise = nn.ModuleList(conv(width, width, 1) for _ in range(layers))
        self.project = nn.Sequential(
            conv(width, 2 * width, 1), nn.GELU(), conv(2 * width, out_channels, 1)
        )

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
