"""The toy problem of the PBT paper's Fig. 2 (PAPERS.md §2), as a trainable.

Maximise Q(θ) = 1.2 − (θ0² + θ1²) while training by gradient ascent on the surrogate
Q̂(θ|h) = 1.2 − (h0·θ0² + h1·θ1²): the hyperparameters h decide which coordinates are
trained at all, so a member stuck at h = (1, 0) never lowers θ1. Exploit carries a good θ
to other members; explore moves h. Each step reports `q` (the true objective after the
step) and `loss` (−Q̂ before the step, so that a copied member's next loss equals its
donor's).

`step_seconds` makes each step sleep that long: the benchmark's stand-in for a real
training step when it measures the population's overhead.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class ToyTrainer:
    def __init__(self, seed: int, theta: tuple[float, float] = (0.9, 0.9), lr: float = 0.01,
                 step_seconds: float = 0.0):  # fmt: skip
        self.theta_ = np.asarray(theta, dtype=np.float64)
        self.lr = float(lr)
        self.step_seconds = float(step_seconds)
        self.steps_ = 0
        self.seed = seed

    def step(self, hparams: dict[str, Any]) -> dict[str, float]:
        missing = [k for k in ("h0", "h1") if k not in hparams]
        if missing:
            raise ValueError(f"search_space: needs {' and '.join(missing)} (Q̂'s weights)")
        h = np.array([float(hparams["h0"]), float(hparams["h1"])])
        lr = float(hparams.get("lr", self.lr))
        loss = -(1.2 - float(np.sum(h * self.theta_**2)))
        if self.step_seconds:
            time.sleep(self.step_seconds)
        self.theta_ = self.theta_ + lr * (-2.0 * h * self.theta_)  # ascent on Q̂
        self.steps_ += 1
        return {"q": q(self.theta_), "loss": loss}

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self.theta_.tolist(), "steps": self.steps_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.theta_ = np.asarray(state["theta"], dtype=np.float64)
        self.steps_ = int(state["steps"])


def q(theta: np.ndarray) -> float:
    return float(1.2 - np.sum(np.asarray(theta) ** 2))


def build(seed: int, options: dict[str, Any]) -> ToyTrainer:
    """The `toy` trainable; options: theta (start), lr, step_seconds."""
    known = {"theta", "lr", "step_seconds"}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"options: unknown key {sorted(unknown)[0]!r} (known: {sorted(known)})")
    return ToyTrainer(seed, **options)


build.hyperparameters = ("h0", "h1", "lr")  # type: ignore[attr-defined]
