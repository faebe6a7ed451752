"""PI-SC vs PI-HC vs PI-HC-MoE on diffusion–sorption, and where a training step's time goes.

    python -m benchmarks.moe [--quick]

In one run, with equal steps and seeds:
1. accuracy — test relative L2 of PI-SC, PI-HC and PI-HC-MoE (K = 4) after training;
2. step time of PI-HC vs PI-HC-MoE at the same total collocation points, experts as Ray
   actors on 2 workers: the median step of a short training run of each on a finer grid,
   after its first third (a network at initialisation needs 0-2 LM iterations per solve,
   a training one 5-20, so steps of an untrained model would time almost no solver);
3. implicit (IFT) vs unrolled backward of the experts' solve: time (with the expert
   actors' heap settings) and peak memory (with every large buffer mapped, so that the
   resident peak is the live one), each in a fresh process;
4. the experts' phase of the same MoE training steps with its four Ray actors on 2 cores
   and with every Ray process on 1 core (parallel efficiency: the same seed gives the
   same steps, compared step by step);
5. the share of the MoE step spent outside the experts' solves.

Prints a table, then one JSON line: rel_l2_sc, rel_l2_hc, rel_l2_moe,
step_speedup_moe_vs_hc, ift_speedup_vs_unrolled, ift_memory_ratio, parallel_efficiency_2,
overhead_fraction.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from actors.heap import HEAP_ENV

# accuracy: every grid point is a collocation point (points >= grid size), so PI-HC and the
# experts see the same rows; timing: the same total points, split four ways for the MoE.
SIZES = {
    True: dict(samples=48, nx=64, nt=21, steps=1000, width=16, layers=3, points=10**6,
               timing_nx=512, timing_nt=51, timing_points=24000, timing_steps=120,
               ift_batch=16),
    False: dict(samples=200, nx=256, nt=51, steps=1000, width=32, layers=4, points=10**6,
                timing_nx=1024, timing_nt=101, timing_points=80000, timing_steps=300,
                ift_batch=32),
}  # fmt: skip


def publish(root: str, size: dict, name: str, nx: int, nt: int, samples: int) -> None:
    from flows.preprocess import PreprocessSpec, run_preprocess
    from flows.runtime import local_cluster
    from flows.storage import Storage

    spec = PreprocessSpec.model_validate(
        {
            "name": name,
            "samples": samples,
            "test_fraction": 0.2,
            "samples_per_task": 4,
            "simulation": {"pde": "diffusion-sorption", "nx": nx, "nt": nt, "t_end": 500.0},
        }
    )
    with local_cluster(2) as cluster:
        run_preprocess(spec, Storage.at(root), dask_address=cluster.scheduler_address)


def train_spec(kind: str, size: dict, dataset: str, **extra):
    """The benchmark's run of `kind`; `extra` may set points, steps, executor,
    cpus_per_expert, warmup_steps, log_every and name."""
    from flows.train import TrainSpec

    steps = extra.get("steps", size["steps"])
    training = {
        "steps": steps,
        "batch_size": 4,
        "lr": 3e-3,
        "lr_halve_every": max(steps // 3, 1),
        "checkpoint_every": 10**6,
        "log_every": extra.get("log_every", 10),
        "seed": 0,
    }
    if "warmup_steps" in extra:
        training["warmup_steps"] = extra["warmup_steps"]
    return TrainSpec.model_validate(
        {
            "name": extra.get("name", f"bench-{kind}"),
            "dataset": dataset,
            "model": {
                "kind": kind,
                "basis": 16,
                "width": size["width"],
                "modes": 8,
                "layers": size["layers"],
                "splits": [1, 4] if kind == "moe" else [1, 1],
            },
            "constraint": {
                "max_iterations": 20,
                "collocation_points": extra.get("points", size["points"]),
            },
            "training": training,
            "experts": {
                "executor": extra.get("executor", "local"),
                "cpus_per_expert": extra.get("cpus_per_expert"),
            },
        }
    )


def accuracy(root: str, size: dict) -> dict[str, float]:
    from flows.storage import Storage
    from flows.train import train

    out = {}
    for kind in ("sc", "hc", "moe"):
        result = train(train_spec(kind, size, "bench-accuracy"), Storage.at(root))
        out[kind] = result.rel_l2_mean
        print(
            f"  {kind:>3}: test relative L2 {result.rel_l2_mean:.2%} "
            f"± {result.rel_l2_std:.2%} ({result.seconds:.0f} s)",
            flush=True,
        )
    return out


def model_and_batch(root: str, size: dict, kind: str, points: int, batch: int = 4):
    from flows.storage import Storage
    from flows.train import build_model, open_problem

    spec = train_spec(kind, size, "bench-timing", points=points)
    problem = open_problem(spec, Storage.at(root))
    torch.manual_seed(0)
    model = build_model(spec, problem)
    u = torch.from_numpy(problem.dataset.arrays("train")[problem.field])
    u = u[torch.arange(batch) % len(u)]  # (batch, nt, nx), samples repeated if few
    return model, u[:, 0].float()


# (run, model kind, experts, CPUs per expert, Ray's processes all on one core)
TIMING_RUNS = (
    ("hc", "hc", 1, 1.0, False),
    ("moe", "moe", 4, 0.5, False),
    ("moe_1core", "moe", 4, 0.5, True),
)


def training_steps(root: str, size: dict, name: str, kind: str, experts: int, cpus: float):
    """Train `kind` on the timing data set with its experts as Ray actors (on the Ray this
    process has started) -> per step: wall time, experts' phase, mean LM iterations."""
    import mlflow

    from flows.storage import Storage
    from flows.train import train

    spec = train_spec(
        kind, size, "bench-timing", name=f"bench-timing-{name}",
        points=size["timing_points"] // experts, steps=size["timing_steps"],
        warmup_steps=max(size["timing_steps"] // 4, 1), log_every=1,
        executor="ray", cpus_per_expert=cpus,
    )  # fmt: skip
    result = train(spec, Storage.at(root))
    client = mlflow.MlflowClient()
    out = {}
    for key in ("step_seconds", "expert_seconds", "lm_iterations"):
        history = sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.step)
        out[key] = [m.value for m in history]
    return out


def step_timing(root: str, size: dict) -> dict[str, float]:
    """Medians over the training steps after the first third (the warm-up and the network's
    first moves, when the solves need few iterations)."""
    import ray

    from flows.runtime import start_local_ray

    runs = {}
    skip = size["timing_steps"] // 3
    cores = os.sched_getaffinity(0)
    for name, kind, experts, cpus, one_core in TIMING_RUNS:
        if one_core:  # Ray's processes inherit this process's affinity when they start
            os.sched_setaffinity(0, {min(cores)})
        try:
            start_local_ray(2)
        finally:
            os.sched_setaffinity(0, cores)
        try:
            runs[name] = training_steps(root, size, name, kind, experts, cpus)
        finally:
            ray.shutdown()
        seconds = statistics.median(runs[name]["step_seconds"][skip:])
        print(f"  {name}: {seconds:.3f} s/step", flush=True)
    out = {}
    for name, run in runs.items():
        for key, values in run.items():
            out[f"{name}_{key}"] = statistics.median(values[skip:])
    # the same steps (same seed) on one core and on two: compared step by step
    one, two = runs["moe_1core"]["expert_seconds"], runs["moe"]["expert_seconds"]
    pairs = zip(one[skip:], two[skip:], strict=True)
    out["efficiency"] = statistics.median(a / (2 * b) for a, b in pairs)
    its_one, its_two = runs["moe_1core"]["lm_iterations"], runs["moe"]["lm_iterations"]
    out["iterations_differ"] = max(abs(a - b) for a, b in zip(its_one, its_two, strict=True))
    return out


def _backward_probe(kind: str, problem_file: str, queue, repeats: int = 3) -> None:
    """In a fresh process: peak-RSS growth of one solve + backward, and the median time of
    `repeats` of them (the first is the one whose memory is measured)."""
    torch.set_num_threads(1)
    from actors.constraint import LMOptions, solve, solve_unrolled
    from actors.pinn import constraint_for

    data = torch.load(problem_file, weights_only=False)
    residual_fn = constraint_for("diffusion-sorption", {"t_end": 500.0}).residual_fn
    options = LMOptions(max_iterations=20, tolerance=1e-4)
    n = data["n"]
    solve(residual_fn, data["params"], options=options, n_unknowns=n)

    def leaves():
        return tuple(p.clone().requires_grad_(p.is_floating_point()) for p in data["params"])

    params = leaves()
    base = _reset_peak_rss()
    forward, backward, peak = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        if kind == "implicit":
            omega, _ = solve(residual_fn, params, options=options, n_unknowns=n)
        else:
            omega = solve_unrolled(residual_fn, params, options=options, n_unknowns=n)
        t1 = time.perf_counter()
        (omega**2).sum().backward()
        t2 = time.perf_counter()
        peak = _peak_rss() if peak is None else peak
        forward.append(t1 - t0)
        backward.append(t2 - t1)
        del omega
        params = leaves()
    queue.put(
        {
            "forward_s": statistics.median(forward),
            "backward_s": statistics.median(backward),
            "peak_mb": (peak - base) / 1024,
        }
    )


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux); returns it in KiB. The
    warm-up solve's transient peak then no longer hides what the measured call adds."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def _peak_rss() -> int:
    return _status_kb("VmHWM")


def backward_comparison(root: str, size: dict) -> dict[str, dict]:
    """One PI-HC expert problem of the timing grid (all its points, a batch of samples)."""
    from actors.surrogate import unit_rms

    points = size["timing_points"]
    model, initial = model_and_batch(root, size, "hc", points, size["ift_batch"])
    with torch.no_grad():
        basis = unit_rms(model.network(initial, model.grids).double())
    derivs = model.constraint.derivatives(basis, model.grids)
    where = model.partition.sample(0, points, torch.Generator())
    params = model.constraint.expert_params(
        derivs, initial.double(), model.partition, 0, where, model.grids
    )
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "problem.pt")
        torch.save({"params": tuple(p.detach() for p in params), "n": model.basis_size}, path)
        for kind in ("implicit", "unrolled"):
            timed = _probe(kind, path, HEAP_ENV, repeats=3)
            measured = _probe(kind, path, EXACT_RSS_ENV, repeats=1)
            out[kind] = {**timed, "peak_mb": measured["peak_mb"]}
    return out


# The two heaps of the probes. Time: the expert actors' own settings. Memory: every buffer
# above 128 KiB mapped and unmapped, so that the peak RSS is the peak of the live buffers.
# (glibc's default raises its mmap threshold after large frees, and the heap then keeps
# freed buffers: the peaks moved by a quarter between identical runs, 2.8-3.9x as a ratio.)
EXACT_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _probe(kind: str, path: str, env: dict[str, str], repeats: int) -> dict[str, float]:
    """`_backward_probe` in a fresh process started with `env` (glibc reads it once)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with mock.patch.dict(os.environ):  # restored once the process has started
        for k in (*HEAP_ENV, *EXACT_RSS_ENV):
            os.environ.pop(k, None)
        os.environ.update(env)
        process = context.Process(target=_backward_probe, args=(kind, path, queue, repeats))
        process.start()
    try:
        return queue.get(timeout=600)
    finally:
        process.join(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    args = parser.parse_args()
    size = SIZES[args.quick]
    with tempfile.TemporaryDirectory() as root:
        os.environ["PHYSFLOW_HOME"] = root  # the benchmark's MLflow runs stay in here
        print("data sets ...", flush=True)
        publish(root, size, "bench-accuracy", size["nx"], size["nt"], size["samples"])
        publish(root, size, "bench-timing", size["timing_nx"], size["timing_nt"], 10)
        print(f"accuracy after {size['steps']} steps (equal seeds):", flush=True)
        rel = accuracy(root, size)
        print("step timing ...", flush=True)
        timing = step_timing(root, size)
        print("implicit vs unrolled backward ...", flush=True)
        backward = backward_comparison(root, size)

    print(f"\n{'figure':<44} {'value':>12}")
    rows = [
        ("PI-HC step, 1 expert, M points (s)", timing["hc_step_seconds"]),
        ("PI-HC expert's phase (s)", timing["hc_expert_seconds"]),
        ("PI-HC LM iterations per solve", timing["hc_lm_iterations"]),
        ("PI-HC-MoE step, 4 experts on 2 workers (s)", timing["moe_step_seconds"]),
        ("MoE experts' phase, Ray on 2 cores (s)", timing["moe_expert_seconds"]),
        ("MoE experts' phase, Ray on 1 core (s)", timing["moe_1core_expert_seconds"]),
        ("MoE LM iterations per solve", timing["moe_lm_iterations"]),
        ("MoE iterations, 1 vs 2 cores: largest gap", timing["iterations_differ"]),
        (
            "implicit: solve + backward (s)",
            backward["implicit"]["forward_s"] + backward["implicit"]["backward_s"],
        ),
        (
            "unrolled: solve + backward (s)",
            backward["unrolled"]["forward_s"] + backward["unrolled"]["backward_s"],
        ),
        ("implicit backward alone (s)", backward["implicit"]["backward_s"]),
        ("unrolled backward alone (s)", backward["unrolled"]["backward_s"]),
        ("implicit peak memory growth (MB)", backward["implicit"]["peak_mb"]),
        ("unrolled peak memory growth (MB)", backward["unrolled"]["peak_mb"]),
    ]
    for name, value in rows:
        print(f"{name:<44} {value:>12.3f}")
    implicit = backward["implicit"]["forward_s"] + backward["implicit"]["backward_s"]
    unrolled = backward["unrolled"]["forward_s"] + backward["unrolled"]["backward_s"]
    figures = {
        "rel_l2_sc": round(rel["sc"], 4),
        "rel_l2_hc": round(rel["hc"], 4),
        "rel_l2_moe": round(rel["moe"], 4),
        "step_speedup_moe_vs_hc": round(timing["hc_step_seconds"] / timing["moe_step_seconds"], 3),
        "ift_speedup_vs_unrolled": round(unrolled / implicit, 3),
        "ift_memory_ratio": round(
            backward["unrolled"]["peak_mb"] / max(backward["implicit"]["peak_mb"], 1e-3), 3
        ),
        "parallel_efficiency_2": round(timing["efficiency"], 3),
        "overhead_fraction": round(
            1 - timing["moe_expert_seconds"] / timing["moe_step_seconds"], 3
        ),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
