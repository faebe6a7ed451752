"""What both constraints share: gathering an expert's rows, checking its points, RMS.

An expert's problem is made of rows of the global derivative arrays, one row (N,) per
collocation point, so applying omega is a matrix product. `gather_rows` takes those rows
for shared (m,) or per-sample (B, m) flat point indices, as `Partition.sample` returns
them; `gather_blocks` takes several experts' rows from one field at once. `rms` is the
size measure of the physics loss: the 2-norm divided by the square root of the point
count, so the loss does not grow with the grid resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def gather_rows(field: Tensor, points: Tensor) -> Tensor:
    """field (B, N, *grid), points (m,) or (B, m) flat grid indices -> rows (B, m, N)."""
    flat = field.reshape(field.shape[0], field.shape[1], -1)  # (B, N, P)
    # gather (backward: scatter_add) then one copy to (B, m, N): forward and backward about
    # half the time of index_select (whose transposed result every consumer then copied)
    # and of advanced indexing on the transposed field (backward: a sorting accumulate-put)
    return torch.gather(flat, 2, _index(points, flat)).transpose(1, 2).contiguous()


def _index(points: Tensor, flat: Tensor) -> Tensor:
    """(m,) or (B, m) flat indices -> the (B, N, m) index of `flat` (B, N, P)'s last axis,
    on its device (points are drawn on the host, `Partition.sample`)."""
    points = points.to(flat.device)
    return (points if points.ndim == 1 else points[:, None, :]).expand(*flat.shape[:2], -1)


def gather_blocks(field: Tensor, blocks: Sequence[Tensor]) -> list[Tensor]:
    """field (B, N, *grid), one (m_k,) or (B, m_k) index tensor per block -> each block's
    rows (B, m_k, N), each contiguous (as an expert's problem is shipped).

    The backward scatters every block's gradient into one zero-filled gradient of the
    field. (`gather_rows` per block would have each block's backward fill a grid of zeros,
    which autograd then sums; one gather of all blocks split afterwards copies every block
    once more, forward and backward: PI-HC-MoE's driver step on the quick timing problem
    took 141 ms that way, 126 ms this way.)"""
    return list(_GatherBlocks.apply(field, *blocks))


class _GatherBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, field: Tensor, *blocks: Tensor):
        ctx.save_for_backward(*blocks)
        ctx.shape = field.shape
        ctx.set_materialize_grads(False)  # a block nobody used has no gradient to scatter
        return tuple(gather_rows(field, b) for b in blocks)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None):
        blocks = ctx.saved_tensors
        flat = None
        for points, grad in zip(blocks, grads, strict=True):
            if grad is None:
                continue
            if flat is None:
                flat = grad.new_zeros(ctx.shape[0], ctx.shape[1], int(np.prod(ctx.shape[2:])))
            flat.scatter_add_(2, _index(points, flat), grad.transpose(1, 2))
        field_grad = None if flat is None else flat.reshape(ctx.shape)
        return (field_grad, *(None for _ in blocks))


def check_points(points, batch: int, num_points: int) -> Tensor:
    """Flat collocation indices (m,) or (batch, m), integer, inside the grid -> int64."""
    if not isinstance(points, Tensor) or points.dtype not in (torch.int64, torch.int32):
        raise ValueError("points must be an integer tensor of flat grid indices")
    if points.ndim not in (1, 2) or (points.ndim == 2 and points.shape[0] != batch):
        raise ValueError(f"points must be (m,) or ({batch}, m), got {tuple(points.shape)}")
    if points.numel() and (int(points.min()) < 0 or int(points.max()) >= num_points):
        raise ValueError(f"points must be flat indices in [0, {num_points})")
    return points.long()


def rms(r: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Root-mean-square over `dims`: 2-norm / sqrt(count); its gradient at r = 0 is 0."""
    count = int(np.prod([r.shape[d] for d in dims]))
    return torch.linalg.vector_norm(r, dim=dims) / count**0.5
