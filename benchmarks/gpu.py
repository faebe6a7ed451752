"""PI-HC vs PI-HC-MoE training steps at the paper's diffusion–sorption sizes, with torch alone.

    python -m benchmarks.gpu [--device cuda] [--steps 300] [--until SECONDS] [--tiny]

For a machine with a GPU and nothing but torch, numpy and scipy (no Ray, MLflow, Dask or
pydantic needed): the model is physflow's own (`actors.surrogate.PDESurrogate`), its
experts solving in this process on the same device, the MoE's four as one batch of all
their problems (the in-process default on a GPU), and again one after another. The physics-only
loss needs no data set: each step draws the batch's initial values as the data sets do
(one U(0, 0.2) value per sample) and fresh collocation points.

Sizes (PAPERS.md §1): grid 101 × 1 024 (t ≤ 500), FNO width 64, 5 layers, 8 modes, N = 16,
batch 6, LM ≤ 50 iterations at tolerance 1e-4, Adam lr 1e-3 (ramped up over 100 steps, as
configs/ds-moe.yaml), gradient clip 1.0; PI-HC-MoE with K = 4 experts of 20 000 points
each, PI-HC with one of 80 000 (the same total). The network in float64 (`--precision`),
as configs/ds-*.yaml: in float32 at 1 024 cells the solves return a constant u from the
first step and training never leaves it. Each kind trains `--steps` timed steps; the
figures are medians over the last two thirds (a network at initialisation gives solves of
0-2 LM iterations, a training one more).

Per kind: the step, the experts' part of it (solves and implicit backward, the device
synchronised around each), the rest (FNO, derivatives, gathers, loss, optimiser), LM
iterations. JSON: device, precision, step_s_hc, step_s_moe, step_speedup_moe_vs_hc,
overhead_fraction_hc, overhead_fraction_moe (the share of the step outside the experts'
solves; the paper-size goal on a GPU is <= 0.1), lm_iterations_hc, lm_iterations_moe,
step_s_moe_sequential (the same MoE training with its experts one after another) and
batched_experts_speedup (its step over the batched one's).

`--until SECONDS`: then the MoE trains on until that many seconds after the start, at most
the paper's 4 000 steps, the lr halved every fifth of the steps that fit (the paper: every
800 of 4 000), and is scored on `--test-samples` solutions of the data sets' simulator
(relative L2 over the whole grid, as `physflow evaluate`); the JSON line gains train_steps,
lr_halve_every, train_seconds, test_samples, rel_l2_moe, rel_l2_moe_std, final_loss_moe.
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
from actors.pde.diffusion_sorption import DiffusionSorption, cell_centres
from actors.surrogate import PDESurrogate

PAPER = dict(nt=101, nx=1024, width=64, layers=5, modes=8, basis=16, batch=6, points=80_000)
TINY = dict(nt=9, nx=32, width=8, layers=2, modes=4, basis=6, batch=2, points=200)


def synchronize(device: str) -> None:
    """Wait for the device's queued kernels (GPU work runs asynchronously: unsynchronised,
    its time lands wherever the host next waits)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class SyncedExperts:
    """In-process experts whose solve and backward are timed with the device synchronised
    before and after."""

    inner: InProcessExperts
    seconds: float = 0.0  # the latest step's solve + backward

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def solve(self, params):
        synchronize(self.inner.device)
        t0 = time.perf_counter()
        solved = self.inner.solve(params)
        synchronize(self.inner.device)
        self.seconds = time.perf_counter() - t0
        return solved

    def vjp(self, token, omegas, omega_bars):
        synchronize(self.inner.device)
        t0 = time.perf_counter()
        grads = self.inner.vjp(token, omegas, omega_bars)
        synchronize(self.inner.device)
        self.seconds += time.perf_counter() - t0
        return grads


def build(
    kind: str, size: dict, device: str, precision: str = "float64", batched: bool | None = None
) -> PDESurrogate:
    experts = 4 if kind == "moe" else 1
    grids = {
        "t": torch.linspace(0.0, 500.0, size["nt"], dtype=torch.float64),
        "x": torch.from_numpy(cell_centres(size["nx"])),  # the simulator's cells
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
    model.network.to(getattr(torch, precision))
    inner = InProcessExperts(model.expert_config(), experts, device, batched=batched)
    model.executor = SyncedExperts(inner)
    return model


WARMUP_STEPS = 100  # configs/ds-*.yaml: lr ramped up over 100 steps
PAPER_STEPS = 4_000  # PAPERS.md §1: ~4 000 steps, lr halved every 800 (a fifth of them)


def learning_rate(step: int, halve_every: int, base: float = 1e-3) -> float:
    """The training job's schedule (`flows.train.learning_rate` with configs/ds-moe.yaml's
    values): ramped up over the first 100 steps, halved every `halve_every` steps."""
    return base * min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 ** (step // halve_every)


class Trainer:
    """One kind's model, optimiser and record of every step."""

    def __init__(
        self,
        kind: str,
        size: dict,
        device: str,
        precision: str,
        seed: int = 0,
        batched: bool | None = None,
        label: str | None = None,
    ):
        torch.manual_seed(seed)
        self.kind, self.size, self.device = kind, size, device
        self.label = label or kind
        self.model = build(kind, size, device, precision, batched)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.rng = np.random.default_rng(seed)
        self.record: dict[str, list[float]] = {"step": [], "experts": [], "iterations": []}
        self.loss: list[float] = []

    def train(self, until: int, halve_every: int, deadline: float | None = None) -> None:
        """Steps up to step `until` (counted from the first), or until `deadline`
        (perf_counter seconds) has passed."""
        size, model, first = self.size, self.model, len(self.loss)
        every = max((until - first) // 10, 1)
        while len(self.loss) < until and (deadline is None or time.perf_counter() < deadline):
            step = len(self.loss)
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(step, halve_every)
            initial = torch.from_numpy(
                np.repeat(self.rng.uniform(0.0, 0.2, size=(size["batch"], 1)), size["nx"], axis=1)
            ).float()
            generator = torch.Generator().manual_seed(int(self.rng.integers(2**62)))
            synchronize(self.device)
            t0 = time.perf_counter()
            loss, _, solved = model.loss(initial, generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            self.optimizer.step()
            synchronize(self.device)
            self.record["step"].append(time.perf_counter() - t0)
            self.record["experts"].append(model.executor.seconds)
            d = solved.diagnostics
            self.record["iterations"].append(sum(x["iterations_mean"] for x in d) / len(d))
            self.loss.append(float(loss.detach()))
            if (step + 1 - first) % every == 0:
                print(
                    f"  {self.label} step {step + 1}/{until}: loss {self.loss[-1]:.4f}, "
                    f"{self.record['step'][-1]:.3f} s, "
                    f"LM iterations {self.record['iterations'][-1]:.1f}",
                    flush=True,
                )

    def timing(self, steps: int) -> dict:
        """Medians over the last two thirds of the first `steps` steps (a network at
        initialisation gives solves of 0-2 LM iterations, a training one more)."""
        kept = {k: v[steps // 3 : steps] for k, v in self.record.items()}
        return {
            "step_s": statistics.median(kept["step"]),
            "experts_s": statistics.median(kept["experts"]),
            "overhead_fraction": 1.0 - sum(kept["experts"]) / sum(kept["step"]),
            "lm_iterations": statistics.mean(kept["iterations"]),
        }


def test_set(size: dict, samples: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` solutions of the simulator behind the data sets (PDEBench's values), one
    constant u0 ~ U(0, 0.2) each, on the benchmark's grid -> (initial (S, nx) float32,
    truth (S, nt, nx) float64). Drawn from their own seed: none is a training draw."""
    times = np.linspace(0.0, 500.0, size["nt"])
    u0 = np.random.default_rng([seed, 7]).uniform(0.0, 0.2, samples)
    pde, n = DiffusionSorption(), size["nx"]
    truth = np.stack([pde.simulate(np.full(n, v), times) for v in u0])
    return torch.from_numpy(truth[:, 0]).float(), torch.from_numpy(truth)


def relative_l2(model: PDESurrogate, initial: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Per-sample ‖u − û‖₂ / ‖u‖₂ over the whole grid, as `physflow evaluate` scores."""
    errors = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(truth), 6):
            u = model(initial[i : i + 6]).to("cpu", torch.float64)
            diff = (u - truth[i : i + 6]).flatten(1).norm(dim=1)
            errors.append((diff / truth[i : i + 6].flatten(1).norm(dim=1)).numpy())
    model.train()
    return np.concatenate(errors)


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=300, help="timed training steps per kind")
    parser.add_argument(
        "--until",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then train the MoE on (at most 4 000 steps, the schedule compressed to fit) "
        "until this many seconds after the start, and score it on simulated solutions",
    )
    parser.add_argument("--test-samples", type=int, default=30, help="for --until")
    parser.add_argument("--save", metavar="PATH", help="for --until: the MoE's weights")
    parser.add_argument(
        "--precision",
        choices=("float64", "float32"),
        default="float64",
        help="the basis network's (the constraint layer is float64 always)",
    )
    parser.add_argument("--tiny", action="store_true", help="small sizes: checks the script")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps: at least 3 (the first third is not timed)")
    if args.until < 0 or args.test_samples < 1:
        parser.error("--until must be >= 0 and --test-samples >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here (use --device cpu)")
    size = TINY if args.tiny else PAPER
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"{name}: grid {size['nt']} x {size['nx']}, {size['points']} points, "
        f"network in {args.precision}",
        flush=True,
    )
    # The MoE's four experts solve as one batch of all their problems (`InProcessExperts`'
    # default on a GPU); "moe_sequential" is the same training, seed and steps with the
    # experts one after the other.
    trainers = {
        "hc": Trainer("hc", size, args.device, args.precision),
        "moe": Trainer("moe", size, args.device, args.precision, batched=True),
        "moe_sequential": Trainer(
            "moe", size, args.device, args.precision, batched=False, label="moe_sequential"
        ),
    }
    out = {}
    for kind, trainer in trainers.items():
        trainer.train(args.steps, PAPER_STEPS // 5)
        out[kind] = r = trainer.timing(args.steps)
        print(
            f"  {kind}: step {r['step_s']:.3f} s, experts {r['experts_s']:.3f} s, "
            f"outside the experts {r['overhead_fraction']:.0%}, "
            f"LM iterations {r['lm_iterations']:.1f}",
            flush=True,
        )
    result = {
        "device": name,
        "precision": args.precision,
        "step_s_hc": round(out["hc"]["step_s"], 4),
        "step_s_moe": round(out["moe"]["step_s"], 4),
        "step_speedup_moe_vs_hc": round(out["hc"]["step_s"] / out["moe"]["step_s"], 3),
        "overhead_fraction_hc": round(out["hc"]["overhead_fraction"], 3),
        "overhead_fraction_moe": round(out["moe"]["overhead_fraction"], 3),
        "lm_iterations_hc": round(out["hc"]["lm_iterations"], 2),
        "lm_iterations_moe": round(out["moe"]["lm_iterations"], 2),
        "step_s_moe_sequential": round(out["moe_sequential"]["step_s"], 4),
        "batched_experts_speedup": round(out["moe_sequential"]["step_s"] / out["moe"]["step_s"], 3),
    }
    if args.until:
        print(json.dumps(result), flush=True)  # the timing's, should the rest not finish
        result.update(accuracy(trainers["moe"], args, started))
    print(json.dumps(result))
    return result


def accuracy(moe: Trainer, args: argparse.Namespace, started: float) -> dict:
    """The MoE trained on to `args.until` seconds after `started`, then its test error."""
    initial, truth = test_set(moe.size, args.test_samples)
    per_step = statistics.mean(moe.record["step"][-max(args.steps // 3, 1) :])
    # scoring runs one forward a batch of 6: about a third of a training step each
    deadline = started + args.until - per_step * len(truth) / 6 - 5.0
    fit = int((deadline - time.perf_counter()) / (1.1 * per_step))  # later steps: more LM
    total = min(PAPER_STEPS, len(moe.loss) + max(fit, 0))
    halve_every = max(total // 5, 1)  # the paper's: every 800 of 4 000
    print(f"  moe: training on to step {total}, lr halved every {halve_every}", flush=True)
    seconds = time.perf_counter()
    moe.train(total, halve_every, deadline)
    seconds = time.perf_counter() - seconds
    if args.save:
        torch.save(moe.model.state_dict(), args.save)
    errors = relative_l2(moe.model, initial, truth)
    print(
        f"  moe after {len(moe.loss)} steps: test relative L2 {errors.mean():.2%} "
        f"± {errors.std():.2%} over {len(errors)} simulated solutions",
        flush=True,
    )
    return {
        "train_steps": len(moe.loss),
        "lr_halve_every": halve_every,
        "train_seconds": round(seconds, 1),
        "test_samples": len(errors),
        "rel_l2_moe": round(float(errors.mean()), 4),
        "rel_l2_moe_std": round(float(errors.std()), 4),
        "final_loss_moe": round(statistics.mean(moe.loss[-max(len(moe.loss) // 20, 1) :]), 5),
    }


if __name__ == "__main__":
    main()
