"""PI-HC vs PI-HC-MoE training steps at the paper's diffusion–sorption sizes, with torch alone.

    python -m benchmarks.gpu [--device cuda] [--steps 300] [--tiny]

For a machine with a GPU and nothing but torch and numpy (no Ray, MLflow, Dask or
pydantic needed): the model is physflow's own (`actors.surrogate.PDESurrogate`), its
experts solving in this process on the same device, one after another. The physics-only
loss needs no data set: each step draws the batch's initial values as the data sets do
(one U(0, 0.2) value per sample) and fresh collocation points.

Sizes (PAPERS.md §1): grid 101 × 1 024 (t ≤ 500), FNO width 64, 5 layers, 8 modes, N = 16,
batch 6, LM ≤ 50 iterations at tolerance 1e-4, Adam lr 1e-3, gradient clip 1.0; PI-HC-MoE
with K = 4 experts of 20 000 points each, PI-HC with one of 80 000 (the same total). Each
kind trains `--steps` steps; the figures are medians over the last two thirds (a network
at initialisation gives solves of 0-2 LM iterations, a training one more).

Per kind: the step, the experts' part of it (solves and implicit backward, the device
synchronised around each), the rest (FNO, derivatives, gathers, loss, optimiser), LM
iterations. Last line, JSON: device, step_s_hc, step_s_moe, step_speedup_moe_vs_hc,
overhead_fraction_hc, overhead_fraction_moe (the share of the step outside the experts'
solves; the paper-size goal on a GPU is <= 0.1), lm_iterations_hc, lm_iterations_moe.
`--tiny` is a seconds-long version for checking the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from actors.constraint import LMOptions
from actors.experts import InProcessExperts
from actors.surrogate import PDESurrogate

PAPER = dict(nt=101, nx=1024, width=64, layers=5, modes=8, basis=16, batch=6, points=80_000)
TINY = dict(nt=9, nx=32, width=8, layers=2, modes=4, basis=6, batch=2, points=200)


@dataclass
class SyncedExperts:
    """In-process experts whose solve and backward are timed with the device synchronised
    before and after (GPU kernels run asynchronously: unsynchronised, their time lands
    wherever the host next waits)."""

    inner: InProcessExperts
    seconds: float = 0.0  # the latest step's solve + backward

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _sync(self) -> None:
        if self.inner.device.startswith("cuda"):
            torch.cuda.synchronize()

    def solve(self, params):
        self._sync()
        t0 = time.perf_counter()
        solved = self.inner.solve(params)
        self._sync()
        self.seconds = time.perf_counter() - t0
        return solved

    def vjp(self, token, omegas, omega_bars):
        self._sync()
        t0 = time.perf_counter()
        grads = self.inner.vjp(token, omegas, omega_bars)
        self._sync()
        self.seconds += time.perf_counter() - t0
        return grads


def build(kind: str, size: dict, device: str) -> PDESurrogate:
    experts = 4 if kind == "moe" else 1
    grids = {
        "t": torch.linspace(0.0, 500.0, size["nt"], dtype=torch.float64),
        "x": (torch.arange(size["nx"], dtype=torch.float64) + 0.5) / size["nx"],
    }
    model = PDESurrogate(
        kind=kind,
        pde="diffusion-sorption",
        parameters={"t_end": 500.0, "ridge": 1e-4},
        grids=grids,
        basis=size["basis"],
        width=size["width"],
        modes=size["modes"],
        layers=size["layers"],
        splits=(1, experts),
        options=LMOptions(max_iterations=50, tolerance=1e-4),
        collocation_points=size["points"] // experts,
    ).to(device)
    model.executor = SyncedExperts(InProcessExperts(model.expert_config(), experts, device))
    return model


def train_and_time(kind: str, size: dict, steps: int, device: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build(kind, size, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    record: dict[str, list[float]] = {"step": [], "experts": [], "iterations": [], "loss": []}
    for step in range(steps):
        initial = torch.from_numpy(
            np.repeat(rng.uniform(0.0, 0.2, size=(size["batch"], 1)), size["nx"], axis=1)
        ).float()
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _, solved = model.loss(initial, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        record["step"].append(time.perf_counter() - t0)
        record["experts"].append(model.executor.seconds)
        d = solved.diagnostics
        record["iterations"].append(sum(x["iterations_mean"] for x in d) / len(d))
        record["loss"].append(float(loss.detach()))
        if (step + 1) % max(steps // 10, 1) == 0:
            print(
                f"  {kind} step {step + 1}/{steps}: loss {record['loss'][-1]:.4f}, "
                f"{record['step'][-1]:.3f} s, LM iterations {record['iterations'][-1]:.1f}",
                flush=True,
            )
    skip = steps // 3
    kept = {k: v[skip:] for k, v in record.items()}
    step_s = statistics.median(kept["step"])
    experts = sum(kept["experts"]) / sum(kept["step"])
    return {
        "step_s": step_s,
        "experts_s": statistics.median(kept["experts"]),
        "overhead_fraction": 1.0 - experts,
        "lm_iterations": statistics.mean(kept["iterations"]),
        "final_loss": statistics.mean(kept["loss"][-max(len(kept["loss"]) // 10, 1) :]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=300, help="training steps per kind")
    parser.add_argument("--tiny", action="store_true", help="small sizes: checks the script")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps: at least 3 (the first third is not timed)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here (use --device cpu)")
    size = TINY if args.tiny else PAPER
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{name}: grid {size['nt']} x {size['nx']}, {size['points']} points", flush=True)
    out = {kind: train_and_time(kind, size, args.steps, args.device) for kind in ("hc", "moe")}
    for kind, r in out.items():
        print(
            f"  {kind}: step {r['step_s']:.3f} s, experts {r['experts_s']:.3f} s, "
            f"outside the experts {r['overhead_fraction']:.0%}, "
            f"LM iterations {r['lm_iterations']:.1f}"
        )
    result = {
        "device": name,
        "step_s_hc": round(out["hc"]["step_s"], 4),
        "step_s_moe": round(out["moe"]["step_s"], 4),
        "step_speedup_moe_vs_hc": round(out["hc"]["step_s"] / out["moe"]["step_s"], 3),
        "overhead_fraction_hc": round(out["hc"]["overhead_fraction"], 3),
        "overhead_fraction_moe": round(out["moe"]["overhead_fraction"], 3),
        "lm_iterations_hc": round(out["hc"]["lm_iterations"], 2),
        "lm_iterations_moe": round(out["moe"]["lm_iterations"], 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
