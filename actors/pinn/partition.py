"""The fixed split of the space-time grid into the experts' sub-domains (PI-HC-MoE).

Chalapathi, Du and Krishnapriyan (ICLR 2024) replace the single global constraint solve
of PI-HC by K independent solves, one per sub-domain of a fixed, uniform, non-overlapping
partition of the space-time domain. Each expert owns the grid points of its block, its
own coefficients omega_k, its collocation points and initial/boundary rows (for
Navier-Stokes those of its block; for diffusion-sorption the whole initial condition and
both boundaries, as the paper's code replicates them to every expert); nothing couples
the blocks, so the solves run in parallel and their PDE rows are K times fewer. The
outputs are simply put side by side (no continuity is enforced).

The partition here is per axis: `splits[a]` blocks along grid axis a, with the sizes of
`np.array_split` (the first n % s blocks get one point more), so any grid size works. The
experts are numbered in C order over the block multi-index (the last axis varies
fastest): splits (1, 4) on (t, x) gives four x-blocks, expert 0 containing x = 0.
`splits` of all ones is PI-HC: one expert holding every point.

Points are addressed by their flat C-order index into the grid, the same index as
`field.reshape(..., -1)`: `split` gathers expert k's points in increasing flat order and
`merge` scatters them back; both are index gathers, hence differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor


def _as_int_tuple(name: str, value) -> tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}") from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise ValueError(f"{name} must contain integers, got {value!r}")
    return tuple(int(i) for i in items)


@dataclass(frozen=True)
class Partition:
    """`splits[a]` uniform blocks along each axis of a grid of shape `grid_shape`."""

    grid_shape: tuple[int, ...]  # (nt, nx) or (nt, nx, ny)
    splits: tuple[int, ...]  # blocks per axis; K = prod(splits)

    def __post_init__(self) -> None:
        shape = _as_int_tuple("grid_shape", self.grid_shape)
        splits = _as_int_tuple("splits", self.splits)
        if not shape or any(n < 1 for n in shape):
            raise ValueError(f"grid_shape must be non-empty positive sizes, got {shape}")
        if len(splits) != len(shape):
            raise ValueError(
                f"splits {splits} must have one entry per grid axis (grid_shape {shape})"
            )
        for a, (s, n) in enumerate(zip(splits, shape, strict=True)):
            if not 1 <= s <= n:
                raise ValueError(f"splits[{a}] = {s} must be between 1 and the axis size {n}")
        object.__setattr__(self, "grid_shape", shape)
        object.__setattr__(self, "splits", splits)

    @property
    def num_experts(self) -> int:
        return int(np.prod(self.splits))

    @property
    def num_points(self) -> int:
        return int(np.prod(self.grid_shape))

    def _check_expert(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"k must be an integer expert index, got {k!r}")
        if not 0 <= k < self.num_experts:
            raise ValueError(f"k = {k} out of range for {self.num_experts} experts")
        return int(k)

    @cached_property
    def _bounds(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per axis, the (start, stop) of each block: np.array_split sizes."""
        bounds = []
        for n, s in zip(self.grid_shape, self.splits, strict=True):
            sizes = [n // s + (1 if b < n % s else 0) for b in range(s)]
            stops = np.cumsum(sizes)
            bounds.append(tuple((int(e - z), int(e)) for z, e in zip(sizes, stops, strict=True)))
        return tuple(bounds)

    def block(self, k: int) -> tuple[int, ...]:
        """Expert k's block multi-index (C order over `splits`)."""
        k = self._check_expert(k)
        return tuple(int(i) for i in np.unravel_index(k, self.splits))

    def interfaces(self, axis: int) -> list[tuple[int, int]]:
        """(k, j) for every pair of experts whose blocks meet across `axis`: j's block
        starts where k's stops along it, and they share their blocks on the other axes."""
        pairs = []
        for k in range(self.num_experts):
            block = list(self.block(k))
            if block[axis] + 1 < self.splits[axis]:
                block[axis] += 1
                pairs.append((k, int(np.ravel_multi_index(block, self.splits))))
        return pairs

    def slices(self, k: int) -> tuple[slice, ...]:
        """Expert k's sub-domain as one slice per grid axis."""
        return tuple(
            slice(*self._bounds[a][b]) for a, b in enumerate(self.block(self._check_expert(k)))
        )

    @cached_property
    def _indices(self) -> tuple[Tensor, ...]:
        flat = np.arange(self.num_points).reshape(self.grid_shape)
        return tuple(
            torch.from_numpy(np.ascontiguousarray(flat[self.slices(k)].ravel()))
            for k in range(self.num_experts)
        )

    @cached_property
    def _inverse(self) -> Tensor:
        """Position of each flat grid point in torch.cat(split(field), -1)."""
        return torch.argsort(torch.cat(self._indices))

    @cached_property
    def owner(self) -> Tensor:
        """The expert owning each grid point -> (*grid_shape,) int64."""
        out = torch.empty(self.num_points, dtype=torch.int64)
        for k, idx in enumerate(self._indices):
            out[idx] = k
        return out.reshape(self.grid_shape)

    def index(self, k: int) -> Tensor:
        """Flat C-order indices of expert k's points, increasing -> (n_k,) int64."""
        return self._indices[self._check_expert(k)]

    def size(self, k: int) -> int:
        """n_k, the number of grid points of expert k."""
        return int(self.index(k).numel())

    def mask(self, k: int) -> Tensor:
        """True on expert k's points -> (*grid_shape,) bool."""
        out = torch.zeros(self.grid_shape, dtype=torch.bool)
        out[self.slices(k)] = True
        return out

    @property
    def masks(self) -> Tensor:
        """All experts' masks -> (K, *grid_shape) bool; each point is True in exactly one."""
        return torch.stack([self.mask(k) for k in range(self.num_experts)])

    def _check_grid(self, field: Tensor, name: str) -> tuple[int, ...]:
        d = len(self.grid_shape)
        if not isinstance(field, Tensor) or tuple(field.shape[field.ndim - d :]) != (
            self.grid_shape
        ):
            shape = tuple(field.shape) if isinstance(field, Tensor) else type(field).__name__
            raise ValueError(f"{name} must end in the grid shape {self.grid_shape}, got {shape}")
        return tuple(field.shape[: field.ndim - d])

    def split(self, field: Tensor) -> list[Tensor]:
        """field (..., *grid_shape) -> per expert (..., n_k), points in increasing flat order."""
        lead = self._check_grid(field, "field")
        flat = field.reshape(*lead, self.num_points)  # (..., P)
        return [flat[..., idx.to(flat.device)] for idx in self._indices]

    def merge(self, parts: list[Tensor]) -> Tensor:
        """Exact inverse of `split`: per expert (..., n_k) -> (..., *grid_shape)."""
        if not isinstance(parts, (list, tuple)) or len(parts) != self.num_experts:
            got = len(parts) if isinstance(parts, (list, tuple)) else type(parts).__name__
            raise ValueError(f"parts must be a list of {self.num_experts} tensors, got {got}")
        lead = tuple(parts[0].shape[:-1])
        for k, part in enumerate(parts):
            if tuple(part.shape) != (*lead, self.size(k)):
                raise ValueError(
                    f"parts[{k}] must have shape {(*lead, self.size(k))}, got {tuple(part.shape)}"
                )
        flat = torch.cat(list(parts), dim=-1)  # (..., P) in expert order
        return flat[..., self._inverse.to(flat.device)].reshape(*lead, *self.grid_shape)

    def sample(
        self, k: int, m: int, generator: torch.Generator | None = None, first_level: int = 0
    ) -> Tensor:
        """Flat indices of m random collocation points of sub-domain k, drawn without
        replacement, sorted -> (m,) int64; all n_k points (m' = n_k) when m >= n_k.
        Points on the first `first_level` levels of the grid's first axis (time) are left
        out, unless that leaves none."""
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"m must be a positive integer, got {m!r}")
        index = self.index(k)
        if first_level:
            later = index[index >= first_level * math.prod(self.grid_shape[1:])]
            index = later if later.numel() else index
        if m >= index.numel():
            return index
        pick = torch.randperm(index.numel(), generator=generator)[:m]
        return index[pick.sort().values]
