"""Pareto fronts and their hypervolume, all objectives minimised.

The hypervolume is exact (a sweep in 2-D, slicing along the last objective above that), fast
enough for the few hundred points of a search; tests compare it with pymoo's.
"""

from __future__ import annotations

import numpy as np


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """True for each row no other row dominates (<= everywhere, < somewhere)."""
    points = np.asarray(points, dtype=float)
    n = len(points)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        if not mask[i]:
            continue
        dominated_by = np.all(points <= points[i], axis=1) & np.any(points < points[i], axis=1)
        if dominated_by.any():
            mask[i] = False
    return mask


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by `points` and bounded by `reference`; points not strictly better
    than the reference in every objective add nothing."""
    points = np.asarray(points, dtype=float).reshape(-1, len(reference))
    reference = np.asarray(reference, dtype=float)
    points = points[np.all(points < reference, axis=1)]
    if len(points) == 0:
        return 0.0
    return _volume(points[pareto_mask(points)], reference)


def _volume(points: np.ndarray, reference: np.ndarray) -> float:
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    if points.shape[1] == 2:
        volume, ceiling = 0.0, reference[1]
        for x, y in points[np.lexsort((points[:, 1], points[:, 0]))]:
            if y < ceiling:
                volume += (reference[0] - x) * (ceiling - y)
                ceiling = y
        return float(volume)
    # Slices between consecutive values of the last objective: each is the (d-1)-volume of
    # the points at or below it, times its thickness.
    points = points[np.argsort(points[:, -1])]
    volume = 0.0
    for i in range(len(points)):
        upper = points[i + 1, -1] if i + 1 < len(points) else reference[-1]
        if upper > points[i, -1]:
            below = points[: i + 1, :-1]
            volume += (upper - points[i, -1]) * _volume(below[pareto_mask(below)], reference[:-1])
    return float(volume)


def normalise(points: np.ndarray, ideal: np.ndarray, nadir: np.ndarray) -> np.ndarray:
    """Map [ideal, nadir] to [0, 1] per objective, so hypervolumes lie in [0, 1] with the
    reference point at 1."""
    span = np.where(np.asarray(nadir) > np.asarray(ideal), np.asarray(nadir) - ideal, 1.0)
    return (np.asarray(points, dtype=float) - ideal) / span
