"""The trainable contract: what a population member trains.

A trainable is a function `build(seed: int, options: dict) -> trainer`, named in a spec as
`trainable: "mypackage.module:build"` (or the built-ins `toy` and `pde`). `options` is the
spec's `options` mapping, passed through untouched. The trainer it returns is an object with

    step(hparams: dict) -> dict[str, float]
        One training step with these hyperparameters; returns that step's metrics (the
        *report*). Hyperparameters can change between any two steps, so read them here,
        not in `build`. The metric the spec ranks by must be in the report, or in
        `evaluate()`'s.
    state_dict() -> dict
        Everything needed to continue exactly: weights, optimiser moments, step counter,
        and any random state or seed that a step draws from. It must pickle.
    load_state_dict(state: dict) -> None
        Become the trainer that produced `state` (exploit copies a donor's state this way;
        a restarted member loads its last checkpoint this way).

and optionally

    evaluate() -> dict[str, float]
        Called at each ready point, after the steps; its metrics join the last step's
        report (e.g. a validation error to rank by).
    model() -> torch.nn.Module
        The model to log and register when this member wins.
    close() -> None
        Release what the trainer holds (expert actors, files).

The builder may also carry a `hyperparameters` attribute, the names its trainers read
(`build.hyperparameters = ("lr", "momentum")`): a search space naming any other is then a
spec mistake, reported before the members start, not a hyperparameter searched in vain.

Determinism: a step must depend only on the trainer's state and the hyperparameters given
(draw batches from a generator kept in the state, or from (seed, step) with the seed in
the state). A member that loads a donor's state then continues exactly as the donor would
have, and `physflow pbt replay` retrains a member's whole schedule to the same score.

Checkpoints are the member's business, not the trainer's: after each ready interval the
member pickles `state_dict()` and writes it to the search's storage folder atomically.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from actors.pbt.space import Value


@runtime_checkable
class Trainer(Protocol):
    def step(self, hparams: dict[str, Value]) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


Builder = Callable[[int, dict[str, Any]], Trainer]


def import_builder(target: str) -> Builder:
    """`package.module:function` -> the function. Raises LookupError with the reason."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise LookupError(f"{target!r} is not 'module:function' (or a built-in: toy, pde)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LookupError(f"cannot import module {module_name!r} ({exc})") from None
    builder = getattr(module, attr, None)
    if builder is None:
        raise LookupError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(builder):
        raise LookupError(f"{target!r} is not callable")
    return builder


def check_trainer(trainer: object, target: str) -> None:
    """Fail with the missing method's name if `trainer` does not follow the contract."""
    missing = [m for m in ("step", "state_dict", "load_state_dict") if not hasattr(trainer, m)]
    if missing:
        raise TypeError(
            f"trainable {target!r} returned {type(trainer).__name__}, which lacks "
            f"{', '.join(missing)} (see actors.pbt.trainable)"
        )
