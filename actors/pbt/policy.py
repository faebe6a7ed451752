"""Exploit and explore as pure functions that also say what they did.

    exploit: scores of the members at a ready point -> [Exploit(member, donor, why)]
    explore: hyperparameters -> (new hyperparameters, {name: "x 1.2" | "+0.13" | "resample"})

Two exploit rules from the PBT paper (PAPERS.md §2): truncation (the bottom quantile copies
a member drawn uniformly from the top quantile) and binary tournament (each member meets
one other drawn uniformly and copies it if it scores better). A missing or non-finite score
ranks last, so a member that diverged is the first to be replaced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from actors.pbt.space import SearchSpace, Value

Mode = Literal["max", "min"]


@dataclass(frozen=True)
class Exploit:
    member: int
    donor: int
    reason: str  # e.g. "bottom 20 %: 0.41 < top 1.12", "tournament: 0.41 < 1.12"


def _key(score: float | None, mode: Mode) -> float:
    """A number where larger is better; a missing score is worst."""
    if score is None or not math.isfinite(score):
        return -math.inf
    return score if mode == "max" else -score


def ranked(scores: Mapping[int, float | None], mode: Mode) -> list[int]:
    """Members best first; ties broken by member index (deterministic)."""
    return sorted(scores, key=lambda m: (-_key(scores[m], mode), m))


def truncation(
    scores: Mapping[int, float | None],
    mode: Mode,
    quantile: float,
    rng: np.random.Generator,
    members: list[int] | None = None,
) -> list[Exploit]:
    """The bottom `quantile` of the population by rank (at least one member, at most half)
    each copies a member drawn uniformly from the top `quantile`. `members` limits the decision
    to those members (asynchronous PBT decides for the one member that is ready)."""
    order = ranked(scores, mode)
    if len(order) < 2:
        return []
    count = min(max(1, math.ceil(len(order) * quantile)), len(order) // 2)
    top, bottom = order[:count], order[-count:]
    out = []
    for m in bottom:
        if members is not None and m not in members:
            continue
        # As in the paper and Ray Tune: the rank decides, even between equal scores.
        donor = top[int(rng.integers(len(top)))]
        reason = f"bottom {quantile:.0%}: {_fmt(scores[m])} vs top {_fmt(scores[donor])}"
        out.append(Exploit(m, donor, reason))
    return out


def tournament(
    scores: Mapping[int, float | None],
    mode: Mode,
    rng: np.random.Generator,
    members: list[int] | None = None,
) -> list[Exploit]:
    """Each member meets one other member drawn uniformly and copies it if it is better."""
    everyone = sorted(scores)
    if len(everyone) < 2:
        return []
    out = []
    for m in everyone:
        others = [o for o in everyone if o != m]
        rival = others[int(rng.integers(len(others)))]
        if members is not None and m not in members:
            continue
        if _key(scores[rival], mode) > _key(scores[m], mode):
            reason = f"tournament: {_fmt(scores[m])} vs {_fmt(scores[rival])}"
            out.append(Exploit(m, rival, reason))
    return out


def explore(
    hparams: Mapping[str, Value],
    space: SearchSpace,
    rng: np.random.Generator,
    resample_probability: float,
) -> tuple[dict[str, Value], dict[str, str]]:
    """Each hyperparameter is redrawn from its prior with `resample_probability`, else
    perturbed (x factor or + noise, clipped to its bounds; a categorical moves to a
    neighbour)."""
    new, ops = dict(hparams), {}
    for p in space.params:
        if rng.random() < resample_probability:
            new[p.name], ops[p.name] = p.sample(rng), "resample"
        else:
            new[p.name], ops[p.name] = p.perturb_value(hparams[p.name], rng)
    return new, ops


def _fmt(score: float | None) -> str:
    return "none" if score is None else f"{score:.4g}"
