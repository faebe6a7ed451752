"""What both constraints share: gathering an expert's rows, checking its points, RMS.

An expert's problem is made of rows of the global derivative arrays, one row (N,) per
collocation point, so applying omega is a matrix product. `gather_rows` takes those rows
for shared (m,) or per-sample (B, m) flat point indices, as `Partition.sample` returns
them. `rms` is the size measure of the physics loss: the 2-norm divided by the square
root of the point count, so the loss does not grow with the grid resolution.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def gather_rows(field: Tensor, points: Tensor) -> Tensor:
    """field (B, N, *grid), points (m,) or (B, m) flat grid indices -> rows (B, m, N)."""
    flat = field.reshape(field.shape[0], field.shape[1], -1)  # (B, N, P)
    # gather (backward: scatter_add) then one copy to (B, m, N): forward and backward about
    # half the time of index_select (whose transposed result every consumer then copied)
    # and of advanced indexing on the transposed field (backward: a sorting accumulate-put)
    points = points.to(flat.device)  # drawn on the host (`Partition.sample`)
    shared = points.ndim == 1
    index = (points if shared else points[:, None, :]).expand(*flat.shape[:2], -1)  # (B, N, m)
    return torch.gather(flat, 2, index).transpose(1, 2).contiguous()


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
