"""Small files in PDEBench's two 1-D HDF5 layouts, written the way PDEBench writes them."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def per_sample_file(path: Path, n: int = 6, nt: int = 5, nx: int = 8, seed: int = 0) -> np.ndarray:
    """Groups '0000', '0001', ... with data (nt, nx, 1), grid/x, grid/t. Returns (n, nt, nx)."""
    rng = np.random.default_rng(seed)
    data = rng.uniform(0, 1, size=(n, nt, nx))
    x = (np.arange(nx) + 0.5) / nx
    t = np.linspace(0, 500, nt)
    with h5py.File(path, "w") as f:
        for i in range(n):
            g = f.create_group(f"{i:04d}")
            g.create_dataset("data", data=data[i][..., None].astype(np.float32))
            g.create_dataset("grid/x", data=x)
            g.create_dataset("grid/t", data=t)
    return data.astype(np.float32)


def tensor_file(path: Path, n: int = 7, nt: int = 5, nx: int = 8, seed: int = 1) -> np.ndarray:
    """`tensor` (n, nt, nx), `x-coordinate` (nx,), `t-coordinate` (nt + 1,) as in the
    advection/Burgers files. Returns the tensor."""
    rng = np.random.default_rng(seed)
    tensor = rng.normal(size=(n, nt, nx)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("tensor", data=tensor)
        f.create_dataset("x-coordinate", data=(np.arange(nx) + 0.5) / nx)
        f.create_dataset("t-coordinate", data=np.linspace(0, 2, nt + 1))
    return tensor
