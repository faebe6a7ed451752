"""An elastic MLP classifier on scikit-learn's digits (8x8 images, 10 classes).

Depth 1..max_depth hidden layers, each with a width from `widths`. A sub-network uses the
first `depth` hidden layers and, in each, the first `width_i` units (the rows of the weight
matrix; the next layer takes the matching columns) — the weight sharing of once-for-all
networks. The output layer is shared by every depth and reads the first units of whichever
hidden layer is last. The default space has 7 + 7^2 + 7^3 + 7^4 = 2 800 sub-networks: small
enough to evaluate every one (the ground truth of tests and benchmarks), large enough for
search strategies to differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actors.nas.space import Config, SearchSpace
from actors.nas.supernet import SuperNetwork, set_weights

WIDTHS = (8, 16, 24, 32, 48, 64, 96)
FEATURES, CLASSES = 64, 10


class ElasticMLP(SuperNetwork):
    kind = "mlp-digits"
    metric = "error"
    eval_chunk = 4096  # the whole validation split in one pass

    def __init__(self, max_depth: int = 4, widths: Sequence[int] = WIDTHS):
        super().__init__()
        if max_depth < 1 or not widths or min(widths) < 1:
            raise ValueError(f"need max_depth >= 1 and positive widths, got {max_depth}, {widths}")
        self.max_depth = int(max_depth)
        self.widths = tuple(sorted(set(int(w) for w in widths)))
        top = self.widths[-1]
        self.hidden = nn.ModuleList(
            nn.Linear(FEATURES if i == 0 else top, top) for i in range(self.max_depth)
        )
        self.head = nn.Linear(top, CLASSES)
        self._space = SearchSpace(
            {
                "depth": tuple(range(1, self.max_depth + 1)),
                **{f"width_{i + 1}": self.widths for i in range(self.max_depth)},
            },
            gates={f"width_{i + 1}": ("depth", i + 1) for i in range(1, self.max_depth)},
        )
        self.active = self._space.largest()

    @property
    def space(self) -> SearchSpace:
        return self._space

    def arch(self) -> dict[str, Any]:
        return {"max_depth": self.max_depth, "widths": list(self.widths)}

    def _layers(self, config: Config) -> list[tuple[int, int]]:
        """(in, out) features of each linear layer of the sub-network, output layer last."""
        sizes = [FEATURES] + [config[f"width_{i + 1}"] for i in range(config["depth"])]
        return [*zip(sizes[:-1], sizes[1:], strict=True), (sizes[-1], CLASSES)]

    def _weights(self, config: Config) -> list[tuple[Tensor, Tensor]]:
        layers = self._layers(self.space.canonical(config))
        modules = [*self.hidden[: len(layers) - 1], self.head]
        return [(m.weight[:o, :i], m.bias[:o]) for m, (i, o) in zip(modules, layers, strict=True)]

    def forward(self, x: Tensor) -> Tensor:  # (B, 64) -> (B, 10) logits
        weights = self._weights(self.active)
        for w, b in weights[:-1]:
            x = F.relu(F.linear(x, w, b))
        return F.linear(x, *weights[-1])

    def count(self, config: Config) -> dict[str, float]:
        layers = self._layers(self.space.canonical(config))
        macs = sum(i * o for i, o in layers)
        return {"params": float(macs + sum(o for _, o in layers)), "macs": float(macs)}

    def extract(self, config: Config) -> nn.Module:
        layers = self._layers(self.space.canonical(config))
        modules: list[nn.Module] = []
        for i, o in layers:
            modules += [nn.Linear(i, o), nn.ReLU()]
        net = nn.Sequential(*modules[:-1])
        weights = {}
        for k, (w, b) in enumerate(self._weights(config)):
            weights[f"{2 * k}.weight"], weights[f"{2 * k}.bias"] = w, b
        return set_weights(net, weights)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)

    def metric_value(self, output: Tensor, target: Tensor) -> float:
        return float((output.argmax(1) != target).float().mean())


def digits_splits(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Seeded 60/20/20 train/validation/test split of `load_digits`, standardised with the
    training split's per-pixel statistics (a pixel constant in training is only centred,
    as sklearn's StandardScaler does: dividing by its zero spread blew a digit that has
    ink there up to 1e6)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, random_state=seed, stratify=y
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest
    )
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0

    def pack(a: np.ndarray, b: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.tensor((a - mean) / std, dtype=torch.float32), torch.tensor(b)

    return {
        "train": pack(x_train, y_train),
        "validation": pack(x_val, y_val),
        "test": pack(x_test, y_test),
    }
