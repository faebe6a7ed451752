"""What every super-network offers the search: elastic variables, activation with shared
weights, exact size counts, and extraction of a standalone sub-network.

    net.space                      -> SearchSpace (variables, choices)
    net.activate(config); net(x)   -> output of that sub-network, weights shared with all others
    net.count(config)              -> {"params": ..., "macs": ...}, exact, without running it
    net.extract(config)            -> a plain torch module with copies of the sliced weights
    net.loss(out, y), net.metric_value(out, y)   -> training loss, validation metric

The metric is lower-is-better (`error`, `rel_l2`). A super-network measures its metric,
`latency_ms`, `params` and `macs`; the first is validated on data, the second timed, and the
last two are counted exactly from the architecture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from actors.nas.space import Config, SearchSpace

COUNTED = ("params", "macs")


class SuperNetwork(nn.Module):
    """Base class: subclasses set `kind` and `metric` and implement the abstract methods."""

    kind: str
    metric: str
    eval_chunk = 256  # validation samples per forward pass: bounds activation memory

    def __init__(self) -> None:
        super().__init__()
        self.active: Config | None = None

    @property
    def space(self) -> SearchSpace:
        raise NotImplementedError

    @property
    def measures(self) -> tuple[str, ...]:
        """The objectives this super-network can report for a sub-network."""
        return (self.metric, "latency_ms", *COUNTED)

    def arch(self) -> dict[str, Any]:
        """Constructor arguments: enough, with a state dict, to rebuild the super-network."""
        raise NotImplementedError

    def activate(self, config: Config) -> SuperNetwork:
        self.active = self.space.canonical(config)
        return self

    def count(self, config: Config) -> dict[str, float]:
        raise NotImplementedError

    def extract(self, config: Config) -> nn.Module:
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def metric_value(self, output: Tensor, target: Tensor) -> float:
        raise NotImplementedError

    def example_input(self, inputs: Tensor, batch_size: int) -> Tensor:
        """A latency batch: the first `batch_size` validation inputs, repeated if too few."""
        reps = -(-batch_size // len(inputs))
        return inputs.repeat(reps, *([1] * (inputs.ndim - 1)))[:batch_size]

    def checkpoint(self) -> dict[str, Any]:
        return {"kind": self.kind, "arch": self.arch(), "state_dict": self.state_dict()}


def params_of(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def set_weights(module: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    """Copy detached, contiguous `weights` into `module` (every parameter named)."""
    module.load_state_dict({k: v.detach().clone().contiguous() for k, v in weights.items()})
    return module


def inference(module: nn.Module, inputs: Tensor, chunk: int) -> Tensor:
    """Outputs over all inputs in chunks of `chunk`, without autograd."""
    with torch.inference_mode():
        return torch.cat([module(inputs[i : i + chunk]) for i in range(0, len(inputs), chunk)])
