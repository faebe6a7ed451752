"""An elastic Fourier neural operator: depth, width and retained modes chosen per sub-network.

The super-network is the project's `FNO` at the largest depth, width and modes. A sub-network
with (depth d, width w, modes m) uses the first d Fourier layers, the first w channels of
every lifted feature map (2w in the projection's hidden layer) and, in every spectral weight,
the wavenumbers |k| < m. Its forward runs the plain `FNO` code of that size on views of the
super-network's weights (`torch.func.functional_call` on a skeleton built on the meta
device), so the activated sub-network and the extracted one compute the same thing, and
gradients of a sub-network reach the shared weights.

Used as a surrogate: input channels are the initial condition broadcast over time plus the
grid coordinates, the output is the field on the whole space-time grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from actors.nas.space import Config, SearchSpace
from actors.nas.supernet import SuperNetwork, params_of, set_weights
from actors.pinn.fno import FNO, _kept


class ElasticFNO(SuperNetwork):
    kind = "fno"
    metric = "rel_l2"
    eval_chunk = 8

    def __init__(
        self,
        grid: Sequence[int],
        depths: Sequence[int] = (1, 2, 3, 4),
        widths: Sequence[int] = (8, 16, 24, 32),
        modes: Sequence[int] = (4, 6, 8),
        padding: int = 4,
    ):
        super().__init__()
        self.grid = tuple(int(n) for n in grid)  # (nt, *space)
        self.dims = len(self.grid)
        self.in_channels = 1 + self.dims  # initial condition + one coordinate per axis
        self.padding = int(padding)
        self._space = SearchSpace(
            {
                "depth": tuple(sorted(set(int(d) for d in depths))),
                "width": tuple(sorted(set(int(w) for w in widths))),
                "modes": tuple(sorted(set(int(m) for m in modes))),
            }
        )
        largest = self._space.largest()
        self.full = self._fno(largest)
        self.active = largest
        self._skeletons: dict[tuple[int, ...], FNO] = {}

    @property
    def space(self) -> SearchSpace:
        return self._space

    def arch(self) -> dict[str, Any]:
        c = self._space.choices
        return {
            "grid": list(self.grid),
            "depths": list(c["depth"]),
            "widths": list(c["width"]),
            "modes": list(c["modes"]),
            "padding": self.padding,
        }

    def _fno(self, config: Config) -> FNO:
        return FNO(
            self.dims,
            self.in_channels,
            1,
            width=config["width"],
            modes=config["modes"],
            layers=config["depth"],
            padding=self.padding,
        )

    def _skeleton(self, config: Config) -> FNO:
        key = self._space.key(config)
        if key not in self._skeletons:
            with torch.device("meta"):
                self._skeletons[key] = self._fno(config)
        return self._skeletons[key]

    def _weights(self, config: Config) -> dict[str, Tensor]:
        """The sub-network's parameters as slices of the super-network's, named as in FNO."""
        d, w, m = config["depth"], config["width"], config["modes"]
        top = self._space.largest()["modes"]
        full = dict(self.full.named_parameters())
        out = {
            "lift.weight": full["lift.weight"][:w],
            "lift.bias": full["lift.bias"][:w],
            "project.0.weight": full["project.0.weight"][: 2 * w, :w],
            "project.0.bias": full["project.0.bias"][: 2 * w],
            "project.2.weight": full["project.2.weight"][:, : 2 * w],
            "project.2.bias": full["project.2.bias"],
        }
        for i in range(d):
            spectral = full[f"spectral.{i}.weight"][:w, :w]
            # full-FFT axes hold k = 0..M-1 then -(M-1)..-1: keep |k| < m from both ends
            for a in range(self.dims - 1):
                axis = 2 + a
                spectral = torch.cat(
                    [spectral.narrow(axis, 0, m), spectral.narrow(axis, 2 * top - m, m - 1)],
                    axis,
                )
            out[f"spectral.{i}.weight"] = spectral.narrow(1 + self.dims, 0, m)
            out[f"pointwise.{i}.weight"] = full[f"pointwise.{i}.weight"][:w, :w]
            out[f"pointwise.{i}.bias"] = full[f"pointwise.{i}.bias"][:w]
        return out

    def forward(self, x: Tensor) -> Tensor:  # (B, 1 + dims, *grid) -> (B, 1, *grid)
        return functional_call(self._skeleton(self.active), self._weights(self.active), (x,))

    def extract(self, config: Config) -> nn.Module:
        config = self._space.canonical(config)
        return set_weights(self._fno(config), self._weights(config))

    def count(self, config: Config) -> dict[str, float]:
        """Exact parameters; MACs per sample from the layer shapes: pointwise layers
        C_in x C_out per grid point, the spectral mixing 4 real MACs per complex weight
        used, and each FFT of P points counted as (P/2) log2 P complex butterflies."""
        config = self._space.canonical(config)
        d, w, m = config["depth"], config["width"], config["modes"]
        points = math.prod(self.grid)
        padded = [self.grid[0] + self.padding, *self.grid[1:]]
        p = math.prod(padded)
        kept = math.prod(2 * _kept(n, m) - 1 for n in padded[:-1]) * _kept(padded[-1], m)
        fft = 4 * (p / 2) * math.log2(p)  # one real FFT of one channel, as complex MACs x 4
        per_layer = w * w * p + 4 * w * w * kept + 2 * w * fft
        macs = self.in_channels * w * p + d * per_layer + (w * 2 * w + 2 * w) * points
        return {"params": float(params_of(self._skeleton(config))), "macs": float(macs)}

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return relative_l2(output, target).mean()

    def metric_value(self, output: Tensor, target: Tensor) -> float:
        return float(relative_l2(output, target).mean())


def relative_l2(output: Tensor, target: Tensor) -> Tensor:
    """Per-sample ||output - target|| / ||target|| over the whole grid."""
    diff = (output - target).flatten(1).norm(dim=1)
    return diff / target.flatten(1).norm(dim=1).clamp_min(1e-12)


def surrogate_pairs(field: np.ndarray, grids: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Trajectories (n, nt, *space) -> inputs (n, 1 + dims, nt, *space), targets (n, 1, ...):
    the initial condition broadcast over time and each axis's coordinate, scaled to [0, 1]."""
    u = torch.as_tensor(np.ascontiguousarray(field), dtype=torch.float32)
    n, shape = len(u), tuple(u.shape[1:])
    initial = u[:, :1].expand(n, *shape)
    coords = []
    for axis, g in enumerate(grids):
        g = torch.as_tensor(np.asarray(g), dtype=torch.float32)
        g = (g - g.min()) / (g.max() - g.min()).clamp_min(1e-12)
        view = [1] * len(shape)
        view[axis] = len(g)
        coords.append(g.reshape(view).expand(shape).expand(n, *shape))
    return torch.stack([initial, *coords], 1), u.unsqueeze(1)
