"""The networks of the three variants and the assembly of the constrained solution.

* PI-SC (`SoftConstrained`): the FNO predicts u directly (one channel); the physics only
  enters through the loss, as a soft penalty.
* PI-HC (`BasisNetwork` + one expert): the FNO predicts N basis functions b_1..b_N over
  the whole grid; a nonlinear least-squares solve picks omega so that u = b . omega
  satisfies the PDE at collocation points (Negiar et al., ICLR 2023).
* PI-HC-MoE (`BasisNetwork` + K experts): the same basis, but each sub-domain k of a
  `Partition` gets its own omega_k (Chalapathi et al., ICLR 2024); `assemble` puts
  u = b . omega_k on sub-domain k's points and concatenates, with no continuity imposed.

The variants share everything but the constraint: the same FNO, the same inputs
(`constraint.inputs`: coordinates and the initial condition broadcast over time) and the
same physics loss on the assembled u. `assemble` is differentiable with respect to both
the basis and the omegas; how gradients reach the omegas (the implicit function theorem
through the solve) is the solver's business.

The networks take either the prepared input (B, C_in, *grid), or, when built with
`for_constraint`, the initial condition and the grids, building the input themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from actors.pinn.fno import FNO
from actors.pinn.partition import Partition


def assemble(basis: Tensor, omegas: Sequence[Tensor], partition: Partition) -> Tensor:
    """basis (B, N, *grid), omegas K x (B, N) -> u (B, *grid) with u = b . omega_k on
    sub-domain k."""
    if not isinstance(basis, Tensor) or basis.ndim != 2 + len(partition.grid_shape):
        raise ValueError(f"basis must be (B, N, *{partition.grid_shape})")
    if not isinstance(omegas, (list, tuple)) or len(omegas) != partition.num_experts:
        got = len(omegas) if isinstance(omegas, (list, tuple)) else type(omegas).__name__
        raise ValueError(f"omegas must be a list of {partition.num_experts} tensors, got {got}")
    batch, n_basis = basis.shape[:2]
    for k, omega in enumerate(omegas):
        if not isinstance(omega, Tensor) or tuple(omega.shape) != (batch, n_basis):
            shape = tuple(omega.shape) if isinstance(omega, Tensor) else type(omega).__name__
            raise ValueError(f"omegas[{k}] must be ({batch}, {n_basis}), got {shape}")
    omegas = [w.to(basis.device, basis.dtype) for w in omegas]
    blocks = tuple(partition.slices(k) for k in range(partition.num_experts))
    return _Assemble.apply(basis, blocks, *omegas)  # (B, *grid)


class _Assemble(torch.autograd.Function):
    """u[block k] = sum_n basis[:, n, block k] omega_k[:, n], block by block.

    The blocks tile the grid, so the forward writes each point of u once and the backward
    each point of the basis' gradient once: no per-point copy of the omegas, and no
    zero-filled whole-grid copy per block for autograd to sum."""

    @staticmethod
    def forward(ctx, basis: Tensor, blocks: tuple, *omegas: Tensor) -> Tensor:
        ctx.blocks = blocks
        ctx.save_for_backward(basis, *omegas)
        u = basis.new_empty((basis.shape[0], *basis.shape[2:]))
        for block, omega in zip(blocks, omegas, strict=True):
            where = (slice(None), *block)
            b = basis[(slice(None), slice(None), *block)]  # (B, N, *block)
            # multiply and reduce: einsum would first copy the strided block contiguous
            torch.sum(b * _spread(omega, b), dim=1, out=u[where])
        return u

    @staticmethod
    def backward(ctx, grad: Tensor):
        basis, *omegas = ctx.saved_tensors
        grad_basis = torch.empty_like(basis) if ctx.needs_input_grad[0] else None
        grad_omegas = []
        for k, (block, omega) in enumerate(zip(ctx.blocks, omegas, strict=True)):
            g = grad[(slice(None), *block)]  # (B, *block)
            b = basis[(slice(None), slice(None), *block)]  # (B, N, *block)
            if grad_basis is not None:
                out = grad_basis[(slice(None), slice(None), *block)]
                torch.mul(g.unsqueeze(1), _spread(omega, b), out=out)
            if ctx.needs_input_grad[2 + k]:
                grad_omegas.append((g.unsqueeze(1) * b).sum(tuple(range(2, b.ndim))))
            else:
                grad_omegas.append(None)
        return grad_basis, None, *grad_omegas


def _spread(omega: Tensor, like: Tensor) -> Tensor:
    """omega (B, N) -> (B, N, 1, ..., 1) to broadcast over `like`'s grid axes."""
    return omega.reshape(*omega.shape, *([1] * (like.ndim - 2)))


class _FieldNetwork(nn.Module):
    """An FNO from the constraint's input channels to `out_channels` fields."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        width: int,
        modes: int,
        layers: int,
        padding: int | Sequence[int],
        constraint: Any = None,
    ):
        super().__init__()
        self.fno = FNO(dims, in_channels, out_channels, width, modes, layers, padding)
        self.constraint = constraint

    @staticmethod
    def _constraint_padding(constraint: Any, padding: int) -> tuple[int, ...]:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
        return tuple(0 if periodic else padding for periodic in constraint.periodic)

    def _fields(self, x: Tensor, grids: Mapping[str, Any] | None) -> Tensor:
        if grids is not None:
            if self.constraint is None:
                raise ValueError(
                    "grids given, but this network has no constraint to build its input: "
                    "pass the input (B, C_in, *grid) or build it with for_constraint()"
                )
            x = self.constraint.inputs(x, grids)  # (B, C_in, *grid)
        weight = self.fno.lift.weight
        return self.fno(x.to(weight.device, weight.dtype))  # (B, C_out, *grid)


class BasisNetwork(_FieldNetwork):
    """f_theta of PI-HC / PI-HC-MoE: (B, C_in, *grid) -> basis (B, num_basis, *grid)."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        num_basis: int = 16,
        width: int = 64,
        modes: int = 8,
        layers: int = 5,
        padding: int | Sequence[int] = 6,
        constraint: Any = None,
    ):
        super().__init__(dims, in_channels, num_basis, width, modes, layers, padding, constraint)
        self.num_basis = num_basis

    @classmethod
    def for_constraint(
        cls,
        constraint: Any,
        num_basis: int = 16,
        width: int = 64,
        modes: int = 8,
        layers: int = 5,
        padding: int = 6,
    ) -> BasisNetwork:
        """Sized for `constraint`, padding every non-periodic axis by `padding` points."""
        pads = cls._constraint_padding(constraint, padding)
        return cls(
            constraint.dims, constraint.in_channels, num_basis, width, modes, layers, pads,
            constraint,
        )  # fmt: skip

    def forward(self, x: Tensor, grids: Mapping[str, Any] | None = None) -> Tensor:
        """x: input (B, C_in, *grid), or initial (B, *space) with grids -> (B, N, *grid)."""
        return self._fields(x, grids)


class SoftConstrained(_FieldNetwork):
    """PI-SC: the FNO predicts u itself: (B, C_in, *grid) -> u (B, *grid)."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        width: int = 64,
        modes: int = 8,
        layers: int = 5,
        padding: int | Sequence[int] = 6,
        constraint: Any = None,
    ):
        super().__init__(dims, in_channels, 1, width, modes, layers, padding, constraint)

    @classmethod
    def for_constraint(
        cls,
        constraint: Any,
        width: int = 64,
        modes: int = 8,
        layers: int = 5,
        padding: int = 6,
    ) -> SoftConstrained:
        """Sized for `constraint`, padding every non-periodic axis by `padding` points."""
        pads = cls._constraint_padding(constraint, padding)
        return cls(constraint.dims, constraint.in_channels, width, modes, layers, pads, constraint)

    def forward(self, x: Tensor, grids: Mapping[str, Any] | None = None) -> Tensor:
        """x: input (B, C_in, *grid), or initial (B, *space) with grids -> u (B, *grid)."""
        return self._fields(x, grids)[:, 0]
