"""PI-SC vs PI-HC vs PI-HC-MoE on diffusion–sorption, and where a training step's time goes.

    python -m benchmarks.moe [--quick]

In one run, with equal steps and seeds:
1. accuracy — test relative L2 of PI-SC, PI-HC and PI-HC-MoE (K = 4) after training;
2. step time of PI-HC vs PI-HC-MoE at the same total collocation points, experts as Ray
   actors on 2 workers;
3. implicit (IFT) vs unrolled backward of the experts' solve: time, and peak memory
   measured in a fresh process each;
4. the experts' phase of the same MoE step with its four Ray actors on 1 core and on 2
   (parallel efficiency), and in this process on one thread (for what Ray costs);
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

import torch

# accuracy: every grid point is a collocation point (points >= grid size), so PI-HC and the
# experts see the same rows; timing: the same total points, split four ways for the MoE.
SIZES = {
    True: dict(samples=48, nx=64, nt=21, steps=1000, width=16, layers=3, points=10**6,
               timing_nx=512, timing_nt=51, timing_points=24000, repeats=5, ift_batch=16),
    False: dict(samples=200, nx=256, nt=51, steps=1000, width=32, layers=4, points=10**6,
                timing_nx=1024, timing_nt=101, timing_points=80000, repeats=5, ift_batch=32),
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
    from flows.train import TrainSpec

    return TrainSpec.model_validate(
        {
            "name": f"bench-{kind}",
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
            "training": {
                "steps": size["steps"],
                "batch_size": 4,
                "lr": 3e-3,
                "lr_halve_every": max(size["steps"] // 3, 1),
                "checkpoint_every": 10**6,
                "log_every": 10,
                "seed": 0,
            },
            "experts": {"executor": extra.get("executor", "local")},
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


def time_steps(model, initial, repeats: int) -> tuple[float, float]:
    """Median wall time of a full training step (forward, solves, loss, backward) and of
    its experts' phase (solve + implicit backward, measured by the executor)."""
    steps, experts = [], []
    for i in range(repeats + 1):
        generator = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        loss, _, solved = model.loss(initial, generator)
        model.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        if i:  # the first step warms up (imports, allocator, Ray object store)
            steps.append(t2 - t0)
            experts.append(solved.seconds + getattr(model.executor, "last_vjp_seconds", 0.0))
    return statistics.median(steps), statistics.median(experts)


def step_timing(root: str, size: dict) -> dict[str, float]:
    import ray

    from actors.experts import InProcessExperts, RayExperts
    from flows.runtime import start_local_ray

    total = size["timing_points"]
    out = {}
    start_local_ray(2)
    try:
        hc, initial = model_and_batch(root, size, "hc", total)
        hc.executor = RayExperts(hc.expert_config(), 1, cpus_per_expert=1.0)
        out["hc_step"], out["hc_experts"] = time_steps(hc, initial, size["repeats"])
        hc.executor.close()

        moe, initial = model_and_batch(root, size, "moe", total // 4)
        moe.executor = RayExperts(moe.expert_config(), 4, cpus_per_expert=0.5)
        out["moe_step"], out["moe_experts_2"] = time_steps(moe, initial, size["repeats"])
        # The same four actors on one core: one worker. Ray's CPUs are only bookkeeping,
        # so the actors' processes are pinned to the core for the measurement.
        pids = [w["pid"] for w in moe.executor.placement()]
        cores = os.sched_getaffinity(pids[0])
        try:
            for pid in pids:
                os.sched_setaffinity(pid, {min(cores)})
            out["moe_step_1"], out["moe_experts_1"] = time_steps(moe, initial, size["repeats"])
        finally:
            for pid in pids:
                os.sched_setaffinity(pid, cores)
        moe.executor.close()
    finally:
        ray.shutdown()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # in this process, the four experts one after the other
    try:
        moe.executor = InProcessExperts(moe.expert_config(), 4)
        out["moe_step_local"], out["moe_experts_local"] = time_steps(moe, initial, size["repeats"])
    finally:
        torch.set_num_threads(threads)
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
        context = multiprocessing.get_context("spawn")
        for kind in ("implicit", "unrolled"):
            queue = context.Queue()
            process = context.Process(target=_backward_probe, args=(kind, path, queue))
            process.start()
            out[kind] = queue.get(timeout=600)
            process.join(60)
    return out


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
        ("PI-HC step, 1 expert, M points (s)", timing["hc_step"]),
        ("PI-HC expert's phase (s)", timing["hc_experts"]),
        ("PI-HC-MoE step, 4 experts on 2 workers (s)", timing["moe_step"]),
        ("MoE experts' phase, 1 Ray worker (s)", timing["moe_experts_1"]),
        ("MoE experts' phase, 2 Ray workers (s)", timing["moe_experts_2"]),
        ("MoE experts' phase, in-process, 1 thread (s)", timing["moe_experts_local"]),
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
        "step_speedup_moe_vs_hc": round(timing["hc_step"] / timing["moe_step"], 3),
        "ift_speedup_vs_unrolled": round(unrolled / implicit, 3),
        "ift_memory_ratio": round(
            backward["unrolled"]["peak_mb"] / max(backward["implicit"]["peak_mb"], 1e-3), 3
        ),
        "parallel_efficiency_2": round(timing["moe_experts_1"] / (2 * timing["moe_experts_2"]), 3),
        "overhead_fraction": round(1 - timing["moe_experts_2"] / timing["moe_step"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
