"""Training a super-network so that all its sub-networks are usable at once.

Each step trains several sub-networks on the same batch and sums their losses (the
"sandwich rule" of slimmable and once-for-all networks): the largest and the smallest are
always included — they bound the space, and the smallest gets no other gradient signal
strong enough — plus `random_per_step` sampled ones. All randomness comes from `seed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from actors.nas.supernet import SuperNetwork, inference


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    random_per_step: int = 2
    seed: int = 0


def train_supernet(
    net: SuperNetwork,
    train: tuple[Tensor, Tensor],
    validation: tuple[Tensor, Tensor],
    options: TrainOptions,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train in place; after each epoch report the mean loss and the validation metric of the
    largest and smallest sub-networks. Returns the last epoch's figures."""
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    space = net.space
    optimizer = torch.optim.Adam(net.parameters(), lr=options.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, options.epochs)
    figures: dict[str, float] = {}
    for epoch in range(options.epochs):
        net.train()
        losses = []
        for x, y in _batches(train, options.batch_size, rng):
            configs = [space.largest(), space.smallest()]
            configs += [space.sample(rng) for _ in range(options.random_per_step)]
            loss = sum(net.loss(net.activate(c)(x), y) for c in configs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item() / len(configs))
        schedule.step()
        net.eval()
        figures = {"supernet_loss": float(np.mean(losses))}
        for name, config in (("largest", space.largest()), ("smallest", space.smallest())):
            output = inference(net.activate(config), validation[0], net.eval_chunk)
            figures[f"supernet_{name}_{net.metric}"] = net.metric_value(output, validation[1])
        if on_epoch:
            on_epoch(epoch + 1, figures)
    net.activate(space.largest())
    return figures


def _batches(data: tuple[Tensor, Tensor], size: int, rng) -> Iterator[tuple[Tensor, Tensor]]:
    order = torch.from_numpy(rng.permutation(len(data[0])))
    for i in range(0, len(order), size):
        index = order[i : i + size]
        yield data[0][index], data[1][index]
