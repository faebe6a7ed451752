"""Latency of one forward pass, measured so that numbers from different runs compare.

Warm-up passes first (allocator, caches, lazy initialisation, CUDA kernels), then the median
and inter-quartile range over timed repeats — the median resists the odd slow pass that a mean
(DyNAS-T's choice) lets through. On a GPU each pass is bracketed by `cuda.synchronize`, or the
timer would only see the kernel launch. The thread count is fixed by the caller (the evaluator
actor), since torch's default follows whatever cores the process happens to see.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LatencyOptions:
    batch_size: int = 1
    warmup: int = 10
    repeats: int = 30
    threads: int = 1


def measure_latency(
    forward: Callable[[], object], options: LatencyOptions, device: torch.device
) -> tuple[float, float]:
    """(median ms, inter-quartile range ms) of `forward()` on `device`."""
    cuda = device.type == "cuda"
    with torch.inference_mode():
        for _ in range(options.warmup):
            forward()
        times = np.empty(options.repeats)
        for i in range(options.repeats):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            forward()
            if cuda:
                torch.cuda.synchronize(device)
            times[i] = time.perf_counter() - start
    q1, median, q3 = np.percentile(times * 1e3, [25, 50, 75])
    return float(median), float(q3 - q1)
