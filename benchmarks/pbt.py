"""Population-based training: the paper's toy problem, PBT vs random search on PI-HC-MoE,
and the population's overhead.

    python -m benchmarks.pbt [--quick]

In one run, on one local Ray:
1. toy (PAPERS.md §2, configs/pbt-toy.yaml): final best Q of PBT, grid, explore-only and
   exploit-only, median over 5 seeds;
2. PI-HC-MoE on a small diffusion–sorption set: the winner's test relative L2 under PBT
   and under random search with the same members, steps and starting hyperparameters,
   median over seeds;
3. overhead: the toy with steps that take `step_s` (a stand-in for real training), PBT,
   4 members, ready every 4 steps: the share of the population's wall time its members
   spend outside training steps (barriers, scheduling, checkpoints, copies); actor start-up
   is not counted.

Searches are driven bare (no MLflow) so that the figures are the population's own.
Prints a table, then one JSON line: toy_q_pbt, toy_q_grid, toy_q_explore_only,
toy_q_exploit_only, moe_rel_l2_pbt, moe_rel_l2_random, overhead_fraction.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

TOY = Path(__file__).resolve().parents[1] / "configs" / "pbt-toy.yaml"

SIZES = {
    True: dict(toy_seeds=5, moe_seeds=2, samples=12, nx=32, nt=11, population=4, steps=24,
               ready=4, step_s=0.1),
    False: dict(toy_seeds=5, moe_seeds=3, samples=40, nx=64, nt=21, population=8, steps=200,
                ready=20, step_s=0.5),
}  # fmt: skip


def search(spec, storage) -> tuple[float, object]:
    """Run one population bare -> (the winner's score, the population's timing)."""
    from flows.pbt import build_population

    population = build_population(spec, storage)
    try:
        population.start()
        lineage = population.run()
    finally:
        population.close()
    return lineage.winner()["score"], population.timing


def toy_spec(*overrides: str):
    from flows.pbt import PbtSpec
    from flows.spec import load_spec

    return load_spec(PbtSpec, TOY, list(overrides))


def toy_scores(size: dict, storage) -> dict[str, float]:
    out = {}
    for strategy in ("pbt", "grid", "explore_only", "exploit_only"):
        scores = [
            search(
                toy_spec(f"strategy={strategy}", f"seed={s}", f"name=toy-{strategy}-{s}"), storage
            )[0]  # fmt: skip
            for s in range(size["toy_seeds"])
        ]
        out[strategy] = statistics.median(scores)
        print(f"  toy {strategy:<13} Q per seed {', '.join(f'{q:.4f}' for q in scores)}")
    return out


def publish(size: dict, storage) -> None:
    from flows.preprocess import PreprocessSpec, run_preprocess
    from flows.runtime import local_cluster

    spec = PreprocessSpec.model_validate(
        {
            "name": "ds-pbt",
            "samples": size["samples"],
            "test_fraction": 0.25,
            "samples_per_task": 4,
            "simulation": {"pde": "diffusion-sorption", "nx": size["nx"], "nt": size["nt"],
                           "t_end": 500.0},
        }
    )  # fmt: skip
    with local_cluster(2) as cluster:
        run_preprocess(spec, storage, dask_address=cluster.scheduler_address)


def moe_spec(size: dict, strategy: str, seed: int):
    from flows.pbt import PbtSpec

    return PbtSpec.model_validate(
        {
            "name": f"moe-{strategy}-{seed}",
            "trainable": "pde",
            "train": {
                "name": "bench",
                "dataset": "ds-pbt",
                "model": {"kind": "moe", "basis": 8, "width": 8, "modes": 4, "layers": 2,
                          "splits": [1, 2]},
                "constraint": {"max_iterations": 15, "collocation_points": 100},
                # members this short search lr without a warm-up, as they were measured
                "training": {"steps": size["steps"], "batch_size": 2, "lr": 3e-3,
                             "warmup_steps": 0},
                "experts": {"executor": "local"},
            },
            "eval_samples": size["samples"],  # the whole test split
            "strategy": strategy,
            "population": size["population"],
            "steps_per_member": size["steps"],
            "ready_interval_steps": size["ready"],
            "metric": "test_rel_l2",
            "mode": "min",
            "exploit": {"method": "truncation", "quantile": 0.25},
            "search_space": {
                "lr": {"prior": "log_uniform", "low": 3e-4, "high": 3e-2},
                "ridge": {"prior": "log_uniform", "low": 1e-6, "high": 1e-2},
                "collocation_points": {"prior": "log_int_uniform", "low": 40, "high": 400},
            },
            "seed": seed,
        }
    )  # fmt: skip


def moe_scores(size: dict, storage) -> dict[str, float]:
    publish(size, storage)
    out = {}
    for strategy in ("pbt", "random"):
        scores = [search(moe_spec(size, strategy, s), storage)[0] for s in range(size["moe_seeds"])]
        out[strategy] = statistics.median(scores)
        print(f"  moe {strategy:<7} rel L2 per seed {', '.join(f'{e:.2%}' for e in scores)}")
    return out


def overhead(size: dict, storage) -> tuple[float, float, float]:
    """-> (overhead fraction, wall seconds, ideal seconds)."""
    from flows.pbt import overhead_fraction

    spec = toy_spec(
        "name=toy-overhead",
        f"options.step_seconds={size['step_s']}",
        "ready_interval_steps=4",
    )
    _, timing = search(spec, storage)
    ideal = spec.steps_per_member * size["step_s"]
    return overhead_fraction(timing), timing.wall_seconds, ideal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 2-core size (about a minute)")
    size = SIZES[parser.parse_args().quick]

    import ray

    from flows.storage import Storage

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PHYSFLOW_HOME"] = tmp
        storage = Storage.at(tmp)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING,
                 _node_ip_address="127.0.0.1")  # fmt: skip
        try:
            print("toy problem (final best Q, 40 steps)")
            toy = toy_scores(size, storage)
            print("PI-HC-MoE, PBT vs random search at equal steps (winner's test relative L2)")
            moe = moe_scores(size, storage)
            fraction, wall, ideal = overhead(size, storage)
        finally:
            ray.shutdown()

    print()
    print(f"{'figure':<36}{'value':>12}")
    for name, q in toy.items():
        print(f"{'toy Q, ' + name + ' (median of seeds)':<36}{q:>12.4f}")
    for name, e in moe.items():
        print(f"{'MoE test rel. L2, ' + name:<36}{e:>12.2%}")
    print(f"{'overhead (wall ' + f'{wall:.1f} s, ideal {ideal:.1f} s)':<36}{fraction:>12.1%}")
    print(f"(whole benchmark {time.perf_counter() - t0:.0f} s)")
    print(
        json.dumps(
            {
                "toy_q_pbt": round(toy["pbt"], 4),
                "toy_q_grid": round(toy["grid"], 4),
                "toy_q_explore_only": round(toy["explore_only"], 4),
                "toy_q_exploit_only": round(toy["exploit_only"], 4),
                "moe_rel_l2_pbt": round(moe["pbt"], 4),
                "moe_rel_l2_random": round(moe["random"], 4),
                "overhead_fraction": round(fraction, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
