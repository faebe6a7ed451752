"""PI-SC vs PI-HC vs PI-HC-MoE on diffusion–sorption, and where a training step's time goes.

    python -m benchmarks.moe [--quick]

In one run, with equal steps and seeds:
1. accuracy — test relative L2 of PI-SC, PI-HC and PI-HC-MoE (K = 4) after training, the
   mean over three training seeds (PI-HC's error moves by half from one seed to another,
   and from one machine to another);
2. step time of PI-HC vs PI-HC-MoE at the same total collocation points, experts as Ray
   actors on 2 workers: both trained side by side on a finer grid, step for step on one
   Ray, and the median step after the first third (a network at initialisation needs 0-2
   LM iterations per solve, a training one 5-20, so steps of an untrained model would
   time almost no solver);
3. implicit (IFT) vs unrolled backward of the experts' solve: time (with the expert
   actors' heap settings) and peak memory (with every large buffer mapped, so that the
   resident peak is the live one), each in a fresh process;
4. the experts' phase of each of those MoE steps run twice on the same inputs, on four
   actors free on the 2 cores and on four pinned to 1 core (parallel efficiency: the
   same problems, the same LM iterations, compared step by step);
5. the share of the MoE step spent outside the experts' solves.

Prints a table, then one JSON line: rel_l2_sc, rel_l2_hc, rel_l2_moe (the seeds' means),
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
# The quick size keeps the full size's 256 cells and saves on time steps, samples and the
# network: the MoE's advantage is one of resolution (on 64 cells PI-HC's one solve fits
# the solution best; at 256 it no longer does, see the README).
SIZES = {
    True: dict(samples=48, nx=256, nt=21, steps=1000, width=16, layers=3, points=10**6,
               timing_nx=512, timing_nt=51, timing_points=24000, timing_steps=120,
               ift_batch=16, seeds=(0, 1, 2)),
    False: dict(samples=200, nx=256, nt=51, steps=1000, width=32, layers=4, points=10**6,
                timing_nx=1024, timing_nt=101, timing_points=80000, timing_steps=300,
                ift_batch=32, seeds=(0, 1, 2)),
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
    """The benchmark's run of `kind`; `extra` may set points, steps, warmup_steps and seed
    (a run of its own, named after it)."""
    from flows.train import TrainSpec

    steps = extra.get("steps", size["steps"])
    seed = extra.get("seed", 0)
    training = {
        "steps": steps,
        "batch_size": 4,
        "lr": 3e-3,
        "lr_halve_every": max(steps // 3, 1),
        "checkpoint_every": 10**6,
        "log_every": 10,
        "seed": seed,
    }
    if "warmup_steps" in extra:
        training["warmup_steps"] = extra["warmup_steps"]
    return TrainSpec.model_validate(
        {
            "name": f"bench-{kind}" + (f"-seed{seed}" if "seed" in extra else ""),
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
            "experts": {"executor": "local"},  # in this process: tiny problems
        }
    )


def accuracy(root: str, size: dict) -> dict[str, list[float]]:
    """kind -> the test relative L2 of each seed's run, in the order of `size["seeds"]`."""
    from flows.storage import Storage
    from flows.train import train

    out: dict[str, list[float]] = {"sc": [], "hc": [], "moe": []}
    for seed in size["seeds"]:
        for kind, scores in out.items():
            spec = train_spec(kind, size, "bench-accuracy", seed=seed)
            result = train(spec, Storage.at(root))
            scores.append(result.rel_l2_mean)
            print(
                f"  seed {seed}, {kind:>3}: test relative L2 {result.rel_l2_mean:.2%} "
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


def _pin(pid: int, cores: set[int]) -> None:
    """Every thread of process `pid` onto `cores` (Linux affinity is per thread; threads
    started later inherit their creator's)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that has ended since
            pass


def _forward_backward(model, initial, generator) -> dict[str, float]:
    """One step's loss and backward (no update) -> wall time, the experts' phase (solve +
    implicit backward, as the experts' executor timed it), mean LM iterations, and the
    solves' CPU time in the actors (the slowest, all)."""
    t0 = time.perf_counter()
    loss, _, solved = model.loss(initial, generator)
    model.zero_grad(set_to_none=True)
    loss.backward()
    d = solved.diagnostics
    solves = [x["cpu_seconds"] for x in d]  # each expert's solve: CPU time in its actor
    return {
        "seconds": time.perf_counter() - t0,
        "experts": solved.seconds + model.executor.last_vjp_seconds,
        "iterations": sum(x["iterations_mean"] for x in d) / len(d),
        "slowest_solve": max(solves),
        "all_solves": sum(solves),
    }


def step_timing(root: str, size: dict) -> dict[str, float]:
    """PI-HC and PI-HC-MoE trained side by side on one Ray, step for step (each one's
    actors idle while the other trains), so that both see the same machine. Each MoE step
    is run twice before its update, once on its four actors free on both cores and once,
    with the same inputs (the same problems, the same LM iterations), on a second set of
    four pinned to one core: the parallel efficiency compares the same work. (Pinning this
    process as well, for its puts and gets, gave the same ratio, and made its own forward
    and backward 5x slower.) Medians over the steps after the first third (the warm-up and
    the network's first moves, when the solves need few iterations)."""
    import ray

    from actors import heap
    from actors.experts import RayExperts
    from flows.runtime import start_local_ray
    from flows.storage import Storage
    from flows.train import build_model, learning_rate, open_problem, step_batch

    heap.use_in_this_process()  # as `train` sets up its driver
    steps = size["timing_steps"]
    specs = {
        kind: train_spec(
            kind, size, "bench-timing", points=size["timing_points"] // experts, steps=steps,
            warmup_steps=max(steps // 4, 1),
        )
        for kind, experts in (("hc", 1), ("moe", 4))
    }  # fmt: skip
    problem = open_problem(specs["hc"], Storage.at(root))
    data = problem.dataset.arrays("train")[problem.field]
    models, optimizers = {}, {}
    for kind, spec in specs.items():
        torch.manual_seed(spec.training.seed)
        models[kind] = build_model(spec, problem)
        optimizers[kind] = torch.optim.Adam(models[kind].parameters(), lr=spec.training.lr)
    # logical CPUs for 1 + 4 x 0.5 + 4 x 0.5 actors: the two cores are what they share
    start_local_ray(5)
    record: dict[str, list[float]] = {}
    try:
        hc_config, moe_config = models["hc"].expert_config(), models["moe"].expert_config()
        one_core = RayExperts(moe_config, 4, cpus_per_expert=0.5)
        core = {min(os.sched_getaffinity(0))}
        for where in one_core.placement():
            _pin(where["pid"], core)
        executors = {
            "hc": [("", RayExperts(hc_config, 1, cpus_per_expert=1.0))],
            "moe": [("", RayExperts(moe_config, 4, cpus_per_expert=0.5)), ("_1core", one_core)],
        }
        t = specs["hc"].training  # batch, seed, clipping: the same for both
        for step in range(steps):
            if step % 20 == 0:
                print(f"  step {step} of {steps}", flush=True)
            for kind in ("hc", "moe") if step % 2 else ("moe", "hc"):  # alternated
                initial, generator = step_batch(data, t.batch_size, t.seed, step)  # as train's
                model, optimizer = models[kind], optimizers[kind]
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(specs[kind].training, step)
                runs = executors[kind] if step % 2 else executors[kind][::-1]
                for suffix, executor in runs:
                    model.executor = executor
                    state = generator.get_state()
                    out = _forward_backward(model, initial, generator)
                    generator.set_state(state)  # the same points for the other run
                    for key, value in out.items():
                        record.setdefault(f"{kind}{suffix}_{key}", []).append(value)
                t0 = time.perf_counter()  # the update: part of the step, not of a run
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                update = time.perf_counter() - t0
                record[f"{kind}_seconds"][-1] += update
    finally:
        ray.shutdown()
    skip = steps // 3
    out = {key: statistics.median(values[skip:]) for key, values in record.items()}
    pairs = zip(record["moe_1core_experts"][skip:], record["moe_experts"][skip:], strict=True)
    out["efficiency"] = statistics.median(a / (2 * b) for a, b in pairs)
    iterations = zip(record["moe_1core_iterations"], record["moe_iterations"], strict=True)
    out["iterations_differ"] = max(abs(a - b) for a, b in iterations)
    for kind in ("hc", "moe"):
        print(f"  {kind}: {out[f'{kind}_seconds']:.3f} s/step", flush=True)
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
    where = model.partition.sample(0, points, torch.Generator(), model.constraint.settling_levels)
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
    parser.add_argument("--quick", action="store_true", help="15-25 minutes on 2 CPU cores")
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

    mean = {kind: statistics.mean(scores) for kind, scores in rel.items()}
    names = {"sc": "PI-SC", "hc": "PI-HC", "moe": "PI-HC-MoE"}
    rows = [
        *(
            (f"{names[kind]} test relative L2, seed {seed}", score)
            for kind, scores in rel.items()
            for seed, score in zip(size["seeds"], scores, strict=True)
        ),
        *((f"{names[kind]} test relative L2, mean", mean[kind]) for kind in rel),
        ("PI-HC step, 1 expert, M points (s)", timing["hc_seconds"]),
        ("PI-HC expert's phase (s)", timing["hc_experts"]),
        ("PI-HC LM iterations per solve", timing["hc_iterations"]),
        ("PI-HC-MoE step, 4 experts on 2 workers (s)", timing["moe_seconds"]),
        ("MoE experts' phase, 4 actors on 2 cores (s)", timing["moe_experts"]),
        ("MoE experts' phase, 4 actors on 1 core (s)", timing["moe_1core_experts"]),
        ("MoE LM iterations per solve", timing["moe_iterations"]),
        ("MoE iterations, 1 vs 2 cores: largest gap", timing["iterations_differ"]),
        ("MoE solves' CPU time in the actors: all four (s)", timing["moe_all_solves"]),
        ("MoE solves' CPU time in the actors: slowest (s)", timing["moe_slowest_solve"]),
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
    width = max(len(name) for name, _ in rows)
    print(f"\n{'figure':<{width}} {'value':>12}")
    for name, value in rows:
        print(f"{name:<{width}} {value:>12.3f}")
    implicit = backward["implicit"]["forward_s"] + backward["implicit"]["backward_s"]
    unrolled = backward["unrolled"]["forward_s"] + backward["unrolled"]["backward_s"]
    figures = {
        "rel_l2_sc": round(mean["sc"], 4),
        "rel_l2_hc": round(mean["hc"], 4),
        "rel_l2_moe": round(mean["moe"], 4),
        "step_speedup_moe_vs_hc": round(timing["hc_seconds"] / timing["moe_seconds"], 3),
        "ift_speedup_vs_unrolled": round(unrolled / implicit, 3),
        "ift_memory_ratio": round(
            backward["unrolled"]["peak_mb"] / max(backward["implicit"]["peak_mb"], 1e-3), 3
        ),
        "parallel_efficiency_2": round(timing["efficiency"], 3),
        "overhead_fraction": round(1 - timing["moe_experts"] / timing["moe_seconds"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
