"""Sub-network search: validations each strategy needs, and the evaluator pool's efficiency.

    python -m benchmarks.nas [--quick]

1. Digits super-network (depth 1-4, 7 widths per layer: 2 800 sub-networks), trained with
   the sandwich rule; every sub-network evaluated once in this process (validation error,
   MACs): the true Pareto front and its hypervolume, objectives normalised to the front's
   ideal and nadir points, reference point 1.1 per objective.
2. Random search, NSGA-II and LINAS, 5 seeds each, budget = the space size: validations
   until the front found reaches 95 % of that hypervolume (median over seeds). A validation
   here reads the sweep's value for the sub-network: the same number a fresh evaluation
   gives, since error and MACs are deterministic.
3. The Ray pool with 4 actors on synthetic evaluations of uneven duration (log-normal around
   40 ms, one in twelve a 10x straggler): busy time / (actors x wall time), asynchronous
   hand-out vs synchronous rounds, the same durations in the same order; printed beside the
   efficiency the same schedule would have without any hand-out overhead.

The last line is the JSON object named in the issue.
"""

from __future__ import annotations

import argparse
import heapq
import json
import time

import numpy as np
import torch

from actors.nas import (
    COUNTED,
    ElasticMLP,
    EvaluatorPool,
    EvaluatorSetup,
    InProcessPool,
    LatencyOptions,
    Linas,
    NSGA2Search,
    RandomSearch,
    SubnetEvaluator,
    SyntheticEvaluator,
    TrainOptions,
    digits_splits,
    hypervolume,
    normalise,
    pareto_mask,
    run_search,
    train_supernet,
)

OBJECTIVES = ["error", "macs"]
SEEDS = range(5)
TARGET = 0.95


class Sweep:
    """The exhaustive evaluation, answering validations by lookup."""

    def __init__(self, net: ElasticMLP, evaluator: SubnetEvaluator):
        self.space = net.space
        self.values = {self.space.key(c): evaluator.evaluate(c) for c in self.space.enumerate()}

    def evaluate(self, config) -> dict[str, float]:
        return self.values[self.space.key(config)]


def evaluations_to_target(strategy, sweep: Sweep, ideal, nadir, target_hv: float) -> int:
    """Validations until the front reaches `target_hv` (the budget if it never does)."""
    reference = np.full(len(OBJECTIVES), 1.1)
    state = {"front": np.empty((0, len(OBJECTIVES))), "reached": None}

    def reached(rows) -> bool:
        if not rows or state["reached"]:
            return bool(state["reached"])
        points = np.vstack([state["front"], rows[-1].objectives(OBJECTIVES)])
        state["front"] = points[pareto_mask(points)]
        if hypervolume(normalise(state["front"], ideal, nadir), reference) >= target_hv:
            state["reached"] = len(rows)
        return bool(state["reached"])

    size = sweep.space.size
    run_search(strategy, InProcessPool(sweep), sweep.space, OBJECTIVES, size, stop_when=reached)
    return state["reached"] or size


def strategy(kind: str, net: ElasticMLP, seed: int):
    space = net.space
    if kind == "random":
        return RandomSearch(space, OBJECTIVES, seed)
    if kind == "nsga2":
        return NSGA2Search(space, OBJECTIVES, seed, population=50)
    # the paper's settings: 50 random to start, an inner NSGA-II of 50 x 50 predictions
    return Linas(
        space,
        OBJECTIVES,
        seed,
        population=50,
        batch=25,
        inner_generations=50,
        counted=net.count,
        counted_names=COUNTED,
    )


def ideal_efficiency(mode: str, durations_ms: list[float], actors: int = 4) -> float:
    """The same durations with zero hand-out overhead: each evaluation to the first free
    actor (async), or rounds of `actors` that last as long as their slowest (sync). What the
    straggler tail alone leaves of perfect efficiency."""
    if mode == "sync":
        wall = sum(max(durations_ms[i : i + actors]) for i in range(0, len(durations_ms), actors))
    else:
        free = [0.0] * actors
        for ms in durations_ms:
            heapq.heappush(free, heapq.heappop(free) + ms)
        wall = max(free)
    return sum(durations_ms) / (actors * wall)


def pool_efficiency(mode: str, durations_ms: list[float]) -> float:
    pool = EvaluatorPool(SyntheticEvaluator, None, actors=4, cpus_per_actor=0.5, mode=mode)
    try:
        for i, ms in enumerate(durations_ms):
            pool.submit((i,), {"sleep_ms": ms})
        for _ in durations_ms:
            pool.next_done()
        return pool.efficiency()
    finally:
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and evaluations")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest, and the machine shared

    t0 = time.perf_counter()
    torch.manual_seed(0)
    splits = digits_splits(0)
    net = ElasticMLP()
    epochs = 30 if args.quick else 60
    train_supernet(net, splits["train"], splits["validation"], TrainOptions(epochs=epochs))
    setup = EvaluatorSetup(net.checkpoint(), *splits["validation"], LatencyOptions(), False)
    sweep = Sweep(net, SubnetEvaluator(setup))
    values = np.array([[v[o] for o in OBJECTIVES] for v in sweep.values.values()])
    true_front = values[pareto_mask(values)]
    ideal, nadir = true_front.min(0), true_front.max(0)
    max_hv = hypervolume(normalise(true_front, ideal, nadir), np.full(len(OBJECTIVES), 1.1))
    print(
        f"super-network: {epochs} epochs; {len(values)} sub-networks evaluated in "
        f"{time.perf_counter() - t0:.1f} s; true front {len(true_front)} points, "
        f"hypervolume {max_hv:.4f}"
    )

    counts: dict[str, list[int]] = {}
    print(f"{'strategy':<8} {'validations to 95 % of max HV, per seed':<44} median")
    for kind in ("random", "nsga2", "linas"):
        t = time.perf_counter()
        counts[kind] = [
            evaluations_to_target(strategy(kind, net, seed), sweep, ideal, nadir, TARGET * max_hv)
            for seed in SEEDS
        ]
        print(
            f"{kind:<8} {str(counts[kind]):<44} {np.median(counts[kind]):>6.0f}"
            f"   ({time.perf_counter() - t:.1f} s)"
        )

    import ray

    from flows.runtime import start_local_ray

    # the synthetic evaluations sleep; 4 actors fit on any machine
    start_local_ray(4)
    rng = np.random.default_rng(0)
    n = 400 if args.quick else 1000
    durations = list(np.clip(rng.lognormal(np.log(40), 0.6, n), 5, 200))
    for i in rng.choice(n, size=n // 12, replace=False):
        durations[i] *= 10  # stragglers
    try:
        efficiency = {mode: pool_efficiency(mode, durations) for mode in ("async", "sync")}
    finally:
        ray.shutdown()
    print(
        f"pool, 4 actors, {n} evaluations of {min(durations):.0f}-{max(durations):.0f} ms: "
        f"efficiency async {efficiency['async']:.3f}, sync {efficiency['sync']:.3f} "
        f"(without hand-out overhead: async {ideal_efficiency('async', durations):.3f}, "
        f"sync {ideal_efficiency('sync', durations):.3f})"
    )

    med = {k: float(np.median(v)) for k, v in counts.items()}
    ratio = med["random"] / med["linas"]
    pool_met = efficiency["async"] >= 0.9 and efficiency["async"] > efficiency["sync"]
    print(
        f"targets: linas <= random / 4: {med['linas']:.0f} vs {med['random']:.0f} "
        f"({ratio:.1f}x, {'met' if ratio >= 4 else 'missed'}); async efficiency >= 0.9 and "
        f"above sync: {'met' if pool_met else 'missed'}"
    )
    print(
        json.dumps(
            {
                "space_size": len(values),
                "evals_to_hv95_random": med["random"],
                "evals_to_hv95_nsga2": med["nsga2"],
                "evals_to_hv95_linas": med["linas"],
                "pool_efficiency_async": round(efficiency["async"], 4),
                "pool_efficiency_sync": round(efficiency["sync"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
