"""`physflow train`: a hard-constrained PDE model trained on a published data set.

    data set ─► batch (IC, truth) ─► network on the driver ─► basis b (B, N, *grid)
       │                                   │  derivatives once, on the global grid
       │                         K experts: slice of b at their collocation points
       │                         └─ LM solve of the PDE on their sub-domain (Ray actors)
       │                                   │  ω_k, implicit-gradient backward
       └────────── loss = physics residual of u = b·ω_k on the full grid

Three model kinds share everything but the constraint: `moe` (K experts), `hc` (one
expert over the whole domain) and `sc` (no experts: the network predicts u and the PDE
residual is a soft penalty). Checkpoints go to storage every `checkpoint_every` steps and
on Ctrl-C, written atomically; `--resume` continues from the last one, in the same MLflow
run.
"""

from __future__ import annotations

import io
import logging
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_serializer, model_validator

import actors
from actors import heap
from flows.datasets import NAME_PATTERN, Dataset, open_dataset
from flows.errors import UserError
from flows.spec import Spec, digest_of
from flows.storage import Storage

EXPERIMENT = "train"


class ModelSpec(Spec):
    kind: Literal["moe", "hc", "sc"] = "moe"
    basis: int = Field(16, ge=1, le=512, description="N, basis functions (hc, moe)")
    width: int = Field(64, ge=4, le=1024)
    modes: int = Field(8, ge=1, le=128)
    layers: int = Field(5, ge=1, le=32)
    splits: list[int] = Field(
        [1, 4], min_length=2, max_length=3, description="sub-domains per axis (t, x[, y]); moe only"
    )
    precision: Literal["float32", "float64"] = Field(
        "float32", description="the network's floats (the constraint layer's are float64)"
    )

    @model_serializer(mode="wrap")
    def _default_precision_unsaid(self, handler) -> dict[str, Any]:
        # as specs were before the key existed: the digests of their runs (resume, PBT) hold
        data = handler(self)
        if data.get("precision") == "float32":
            del data["precision"]
        return data

    @model_validator(mode="after")
    def _splits(self) -> ModelSpec:
        if any(s < 1 for s in self.splits):
            raise ValueError(f"splits {self.splits}: every entry must be at least 1")
        return self

    def partition_splits(self, grids: dict[str, Any]) -> tuple[int, ...]:
        """The sub-domains per axis of the data set's grid (`grids`: axis -> points)."""
        dims = len(grids)
        if self.kind != "moe":
            return (1,) * dims
        if len(self.splits) != dims:
            raise UserError(
                f"model.splits {self.splits}: needs {dims} entries for this data set's "
                f"grid ({', '.join(grids)})"
            )
        for axis, points, split in zip(grids, grids.values(), self.splits, strict=True):
            if split > len(points):
                raise UserError(
                    f"model.splits {self.splits}: {split} sub-domains along {axis}, which "
                    f"has only {len(points)} points in this data set"
                )
        return tuple(self.splits)


class ConstraintSpec(Spec):
    max_iterations: int = Field(50, ge=1, le=10_000)
    tolerance: float = Field(1e-4, gt=0, lt=1)
    damping: float = Field(1e-3, gt=0)
    ridge: float = Field(1e-4, ge=0)
    collocation_points: int = Field(20_000, ge=1, description="per expert, redrawn each step")
    interface_weight: float = Field(
        1.0, ge=0, description="MoE: weight of the jumps between experts in the loss (DS)"
    )
    balance_rows: bool = Field(
        True,
        description="weigh each solve's initial/boundary rows against its PDE rows as the "
        "loss does (DS)",
    )


# Constraint settings only the diffusion-sorption constraint has, and what they set.
DS_ONLY = {"interface_weight": "interface term", "balance_rows": "row weights"}


class TrainingSpec(Spec):
    steps: int = Field(4000, ge=1)
    batch_size: int = Field(6, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, lt=1)
    lr_halve_every: int = Field(800, ge=1, description="steps between halvings of lr")
    warmup_steps: int = Field(
        100, ge=0, description="steps over which lr ramps up linearly to its value (0: none)"
    )
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(
        2, ge=0, description="the newest checkpoints kept in storage (0: every one)"
    )
    log_every: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where the network trains: auto takes a GPU when torch sees one "
        "(population members train on the CPU)",
    )

    @model_serializer(mode="wrap")
    def _default_retention_unsaid(self, handler) -> dict[str, Any]:
        # as specs were before the key existed: the digests of their runs (resume, PBT) hold
        data = handler(self)
        if data.get("keep_checkpoints") == 2:
            del data["keep_checkpoints"]
        return data


class ExpertsSpec(Spec):
    executor: Literal["ray", "local"] = Field(
        "ray", description="Ray actors, or in this process (tiny problems)"
    )
    gpus_per_expert: float | None = Field(None, ge=0, le=8)
    cpus_per_expert: float | None = Field(None, gt=0, le=64)


class TrainSpec(Spec):
    name: str = Field(pattern=NAME_PATTERN, description="run name; checkpoints are kept under it")
    dataset: str = Field(min_length=1, description="data set name or version-folder URL")
    dataset_version: str | None = None
    pde: Literal["diffusion-sorption", "navier-stokes"] | None = Field(
        None, description="the PDE the data set must hold (default: whichever it holds)"
    )
    model: ModelSpec = ModelSpec()
    constraint: ConstraintSpec = ConstraintSpec()
    training: TrainingSpec = TrainingSpec()
    experts: ExpertsSpec = ExpertsSpec()
    eval_batch_size: int = Field(4, ge=1)
    register_as: str | None = Field(None, description="registered model name (default: name)")


@dataclass
class TrainResult:
    run_id: str
    steps: int
    rel_l2_mean: float
    rel_l2_std: float
    seconds: float
    model_uri: str | None
    registered: str | None
    resumed_from: int | None
    step_seconds: float | None = None  # median training step of this session's steps
    expert_share: float | None = None  # of those steps' time, the share in the experts


# The problem: data set -> tensors -------------------------------------------------------


@dataclass
class Problem:
    """What a model needs from a data set: grids, the PDE, the initial conditions."""

    dataset: Dataset
    pde: str
    parameters: dict[str, float]
    field: str
    grids: dict[str, Any]  # axis -> torch tensor (float64)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(len(g) for g in self.grids.values())


def open_problem(spec: TrainSpec, storage: Storage) -> Problem:
    import torch

    from actors.pinn import constraint_fields, constraint_for

    dataset = open_dataset(spec.dataset, spec.dataset_version, storage)
    m = dataset.manifest
    pde = m.pde["name"]
    if spec.pde is not None and spec.pde != pde:
        raise UserError(
            f"dataset {m.name}/{m.version} holds {pde} data, but the spec trains a "
            f"{spec.pde} model (pde: {spec.pde}); choose a {spec.pde} data set"
        )
    try:
        constraint = constraint_for(pde, _pde_parameters(m.pde))
    except ValueError as exc:
        raise UserError(
            f"dataset {m.name}/{m.version}: pde {pde!r} cannot be trained ({exc})"
        ) from None
    if constraint.field not in m.fields:
        raise UserError(
            f"dataset {m.name}/{m.version}: has fields {list(m.fields)}, a {pde} model "
            f"needs {constraint.field!r}"
        )
    for split in ("train", "test"):
        if split not in m.splits or m.splits[split].rows == 0:
            raise UserError(f"dataset {m.name}/{m.version}: no {split} samples")
    for name, what in DS_ONLY.items():
        if name in spec.constraint.model_fields_set and name not in constraint_fields(pde):
            raise UserError(
                f"constraint.{name}: a {pde} model has no {what} (only diffusion-sorption "
                f"has); remove the setting"
            )
    axes = m.fields[constraint.field].axes
    grids = {a: torch.tensor(m.grids[a], dtype=torch.float64) for a in axes}
    return Problem(dataset, pde, _pde_parameters(m.pde), constraint.field, grids)


def _pde_parameters(pde: dict[str, Any]) -> dict[str, float]:
    """The PDE parameters the constraint understands, from the manifest."""
    keep = {
        "diffusivity",
        "porosity",
        "bulk_density",
        "freundlich_k",
        "freundlich_exponent",
        "t_end",
        "viscosity",
    }
    return {k: float(v) for k, v in pde.get("parameters", {}).items() if k in keep}


def build_model(spec: TrainSpec, problem: Problem):
    from actors.constraint import LMOptions
    from actors.pinn import constraint_fields
    from actors.surrogate import PDESurrogate

    parameters = dict(problem.parameters)
    parameters["t_end"] = float(problem.grids["t"][-1])
    parameters["ridge"] = spec.constraint.ridge
    for name in DS_ONLY:  # set explicitly for another PDE: refused by open_problem
        if name in constraint_fields(problem.pde):
            parameters[name] = getattr(spec.constraint, name)
    options = LMOptions(
        max_iterations=spec.constraint.max_iterations,
        tolerance=spec.constraint.tolerance,
        initial_damping=spec.constraint.damping,
    )
    m = spec.model
    model = PDESurrogate(
        kind=m.kind,
        pde=problem.pde,
        parameters=parameters,
        grids=problem.grids,
        basis=m.basis,
        width=m.width,
        modes=m.modes,
        layers=m.layers,
        splits=m.partition_splits(problem.grids),
        options=options,
        collocation_points=spec.constraint.collocation_points,
    )
    if m.precision == "float64":
        # where the grid is fine: the second difference over 1 024 cells multiplies a float32
        # basis' round-off by 4e6 (the README's model section)
        model.network.double()
    return model


# Checkpoints -----------------------------------------------------------------------------


class Checkpoints:
    """`<storage>/runs/<name>/checkpoints/step-NNNNNNN.pt` + `latest.json`, each written
    atomically; the pointer is written after the checkpoint it names, and only then are
    checkpoints beyond the newest `keep` removed (0: none is; a paper-size checkpoint is
    about 120 MB, every 200 of 4 000 steps)."""

    def __init__(self, storage: Storage, name: str, keep: int = 0):
        self.folder = storage.child("runs", name, "checkpoints")
        self.keep = keep

    def latest(self) -> dict[str, Any] | None:
        pointer = self.folder.join("latest.json")
        if not self.folder.exists(pointer):
            return None
        return self.folder.read_json(pointer)

    def load(self, entry: dict[str, Any]) -> dict[str, Any]:
        import torch

        data = self.folder.read_bytes(self.folder.join(entry["file"]))
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    def save(self, state: dict[str, Any]) -> str:
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        name = f"step-{state['step']:07d}.pt"
        self.folder.write_bytes(self.folder.join(name), buffer.getvalue())
        self.folder.write_json(
            self.folder.join("latest.json"),
            {
                "file": name,
                "step": state["step"],
                "run_id": state["run_id"],
                "spec_digest": state["spec_digest"],
            },
        )
        if self.keep:
            for old in self.files()[: -self.keep]:
                if old != name:
                    self.folder.remove(self.folder.join(old))
        return name

    def files(self) -> list[str]:
        """The checkpoints in storage, oldest first."""
        names = self.folder.list_files(self.folder.url)
        return sorted(n for n in names if re.fullmatch(r"step-\d{7}\.pt", n))


# What may change when a run is continued: its step budget, the device (a run may
# continue on another machine), the PDE it states (it only checks the data set, which
# may not change), and how many checkpoints are kept.
RESUMABLE_CHANGES = ("training.steps", "training.device", "pde", "training.keep_checkpoints")


def spec_changes(before: dict[str, Any], after: dict[str, Any], limit: int = 4) -> str:
    """What differs between two resolved specs, as `key: old -> new` (dotted keys; a key
    one of them lacks shows as `absent`), `RESUMABLE_CHANGES` aside, at most `limit` of
    them."""
    from flows.tracking import flatten

    old, new = flatten(before), flatten(after)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, ...) != new.get(k, ...))
    keys = [k for k in keys if k not in RESUMABLE_CHANGES]
    shown = [f"{k}: {old.get(k, 'absent')} -> {new.get(k, 'absent')}" for k in keys[:limit]]
    more = len(keys) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _resumable_digest(spec: TrainSpec) -> str:
    """Everything but `RESUMABLE_CHANGES` must match for a run to be continued. (The steps
    are set to 0 and the other keys left out, not set to a constant, as digests were
    first taken: runs checkpointed before a key existed keep their digest.)"""
    data = spec.resolved()
    data["training"]["steps"] = 0
    for key in RESUMABLE_CHANGES:
        if key != "training.steps":
            *path, leaf = key.split(".")
            node = data
            for part in path:
                node = node[part]
            node.pop(leaf, None)  # a key left out at its default
    return digest_of(data)


def training_device(spec: TrainSpec):
    """The torch device of `training.device`; cuda without a GPU that torch can use is a
    user error."""
    import torch

    wanted = spec.training.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError("training.device: cuda, but torch sees no GPU on this machine")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


# Training --------------------------------------------------------------------------------


def relative_l2(prediction, truth) -> np.ndarray:
    """Per-sample ‖u − û‖₂ / ‖u‖₂ over the whole grid."""
    diff = (prediction - truth).reshape(len(truth), -1)
    return (diff.norm(dim=1) / truth.reshape(len(truth), -1).norm(dim=1)).detach().cpu().numpy()


def evaluate(model, dataset: Dataset, field: str, batch_size: int, limit: int | None = None,
             progress=None):  # fmt: skip
    """Relative L2 of every test sample, and (prediction, truth) of the first batch;
    `progress(done, total)` after each batch."""
    import torch

    errors, first = [], None
    total = dataset.manifest.splits["test"].rows
    total = min(total, limit) if limit is not None else total
    model.eval()
    with torch.no_grad():
        for batch in dataset.batches("test", batch_size=batch_size):
            truth = batch[field].to(torch.float64)  # (B, nt, *space)
            u = model(truth[:, 0]).to(truth.device)
            errors.append(relative_l2(u, truth))
            if first is None:
                first = (u.cpu().numpy(), truth.cpu().numpy())
            done = sum(len(e) for e in errors)
            if progress is not None:
                progress(min(done, total), total)
            if limit is not None and done >= limit:
                break
    model.train()
    return np.concatenate(errors), first


def train(
    spec: TrainSpec,
    storage: Storage | None = None,
    resume: bool | Literal["auto"] = False,
    progress=None,
    ray_address: str | None = None,
) -> TrainResult:
    from flows.lease import Lease

    storage = storage or Storage.from_env()
    # one job at a time continues a run: a second is refused before it reads anything
    with Lease(storage, ("runs", spec.name, "checkpoints"), f"run {spec.name!r}") as lease:
        return _train(spec, storage, resume, progress, ray_address, lease)


def _train(spec: TrainSpec, storage: Storage, resume, progress, ray_address, lease) -> TrainResult:
    import torch

    from flows import tracking
    from flows.runtime import (
        interrupts_deferred,
        ray_is_ending,
        ray_session,
        sigterm_requests_stop,
    )

    t_start = time.perf_counter()
    device = training_device(spec)
    heap.use_in_this_process()  # the driver's buffers reused from step to step
    problem = open_problem(spec, storage)
    train_data = problem.dataset.arrays("train")[problem.field]  # (n, nt, *space)
    torch.manual_seed(spec.training.seed)
    model = build_model(spec, problem).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.training.lr)

    checkpoints = Checkpoints(storage, spec.name, spec.training.keep_checkpoints)
    latest, start, run_id = checkpoints.latest(), 0, None
    digest = _resumable_digest(spec)
    if latest is not None and not resume:
        raise UserError(
            f"run {spec.name!r} already has a checkpoint at step {latest['step']} in "
            f"{checkpoints.folder.url}; continue it with --resume, or choose another name"
        )
    if resume is True and latest is None:
        raise UserError(
            f"--resume: run {spec.name!r} has no checkpoint in {checkpoints.folder.url}"
        )
    if latest is not None:
        state = checkpoints.load(latest)
        if latest["spec_digest"] != digest:
            changed = spec_changes(state.get("spec", {}), spec.resolved())
            if resume is True:
                raise UserError(
                    f"--resume: run {spec.name!r} was started from a different spec "
                    f"({changed}); only {', '.join(RESUMABLE_CHANGES)} may change when resuming"
                )
            raise UserError(  # `physflow run`, which continues a run of its name
                f"run {spec.name!r} exists from a different spec ({changed}); continuing it, "
                f"only {', '.join(RESUMABLE_CHANGES)} may change: to start afresh, give the "
                f"new one another name (--set train.name=...)"
            )
        start, run_id = state["step"], state["run_id"]
        # a run stopped after its last step but before its model was logged is finished
        # by --resume: scored, logged and registered
        finished = start == spec.training.steps and _logged_model(run_id) is not None
        if start > spec.training.steps or (resume is True and finished):
            raise UserError(
                f"{'--resume: ' if resume is True else ''}run {spec.name!r} is at step "
                f"{start} already; set training.steps above it to train on"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def checkpoint(step: int, run_id: str) -> None:
        lease.check()
        checkpoints.save(
            {
                "step": step,
                "run_id": run_id,
                "spec_digest": digest,
                "spec": spec.resolved(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
            }
        )

    # no Ray for a run with nothing left to train: it is only scored again, in-process
    use_ray = (
        spec.experts.executor == "ray" and model.num_experts > 0 and start < spec.training.steps
    )
    with (
        tracking.job_run(EXPERIMENT, spec.name, spec.resolved(), run_id=run_id) as run,
        # as Ctrl-C: the last finished step is saved (with Ray's 3 s before it kills a
        # stopped job, a step left to finish might not be)
        sigterm_requests_stop(interrupt=True) as stop_requested,
        ray_session(ray_address, enabled=use_ray),
    ):
        run.set_tags(
            {
                "dataset": f"{problem.dataset.manifest.name}/{problem.dataset.manifest.version}",
                "model.kind": spec.model.kind,
                "pde": problem.pde,
                "experts": model.num_experts,
                "device": str(device),
            }
        )
        if use_ray:
            from actors.experts import RayExperts

            model.executor = RayExperts(
                model.expert_config(),
                model.num_experts,
                spec.experts.gpus_per_expert,
                spec.experts.cpus_per_expert,
            )
            run.log_json(model.executor.placement(), "experts/placement.json")
        done = {"step": start, "times": []}
        try:
            _loop(spec, model, optimizer, train_data, done, run, checkpoint, progress,
                  stop_requested)  # fmt: skip
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (`Terminated`)
            # a second Ctrl-C (people press it twice) waits for the checkpoint to be saved;
            # a third abandons it (a store out of reach can hang the save for minutes)
            with interrupts_deferred(
                held_at_most=1, notice="saving the checkpoint; Ctrl-C again abandons it"
            ):
                if done.get("unlogged"):  # the last step's metrics, between two log steps
                    run.log_metrics(*done["unlogged"])
                run.set_tags({"interrupted_at_step": done["step"]})
                checkpoint(done["step"], run.run_id)
            raise
        finally:
            if model.executor is not None:
                if not ray_is_ending():
                    model.executor.close()
                model.executor = None
        errors, first = evaluate(model, problem.dataset, problem.field, spec.eval_batch_size)
        timing = step_summary(done["times"])
        run.log_metrics(
            {
                "test_rel_l2_mean": float(errors.mean()),
                "test_rel_l2_std": float(errors.std()),
                **{k: v for k, v in timing.items() if v is not None},
            }
        )
        from flows import plots

        run.log_figure(plots.prediction(first[0][0], first[1][0], problem), "prediction.png")
        # nothing trained in this call (`physflow run` again on a finished run): the
        # run's model stands, and no identical version is registered
        kept = _logged_model(run.run_id) if latest is not None and done["step"] == start else None
        if kept is not None:
            model_uri, registered = kept, spec.register_as or spec.name
        else:  # logged from the CPU: a model saved with CUDA tensors needs a GPU to unpickle
            lease.check()
            model_uri, registered = _log_model(run, model.cpu(), problem, spec)
    return TrainResult(
        run_id=run.run_id,
        steps=spec.training.steps,
        rel_l2_mean=float(errors.mean()),
        rel_l2_std=float(errors.std()),
        seconds=time.perf_counter() - t_start,
        model_uri=model_uri,
        registered=registered,
        resumed_from=start if latest is not None else None,
        step_seconds=timing["step_seconds_median"],
        expert_share=timing["expert_share"],
    )


def step_summary(times: list[tuple[float, float | None]]) -> dict[str, float | None]:
    """(step seconds, experts' seconds or None) of each step -> the median step and the
    share of the steps' time spent in the experts (solve + backward), the first step left
    out when there are others (it starts what later steps reuse)."""
    steady = times[1:] if len(times) > 1 else times
    if not steady:
        return {"step_seconds_median": None, "expert_share": None}
    total = sum(t for t, _ in steady)
    experts = [e for _, e in steady if e is not None]
    share = sum(experts) / total if experts and total > 0 else None
    return {
        "step_seconds_median": statistics.median(t for t, _ in steady),
        "expert_share": share,
    }


def learning_rate(t: TrainingSpec, step: int, base: float | None = None) -> float:
    """The learning rate of step `step` (from 0): `base` (default `t.lr`) ramped up linearly
    over the first `t.warmup_steps` steps, and halved every `t.lr_halve_every` steps.

    A pure function of the step, so a resumed run (or a PBT member) needs no scheduler
    state. Why the warm-up: Adam's first steps move every weight by about lr whatever the
    gradient's size, and a single-constraint (PI-HC) model started at full rate can fall
    within five steps onto a basis whose solves return a constant u (zero PDE residual) and
    stay there, its gradient near zero. Quick benchmark, lr 3e-3, 1 000 steps: 70 % test
    error in two seeds of three at full rate from the start, 1.6-3.9 % ramped up over 100."""
    base = t.lr if base is None else base
    ramp = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    return base * ramp * 0.5 ** (step // t.lr_halve_every)


def _loop(spec, model, optimizer, train_data, done, run, checkpoint, progress,
          stop_requested=lambda: False):  # fmt: skip
    """The training steps from `done["step"]`, which it keeps up to date, appending each
    step's seconds and its experts' seconds to `done["times"]` (and keeping in
    `done["unlogged"]` the last step's metrics while `log_every` has not logged them).
    Each step's batch and collocation points come from (seed, step), so a resumed or
    retried step sees exactly what the original would have. An interrupt never falls
    between a step's update and its count. Should a SIGTERM's raise have been swallowed
    (`stop_requested()`), it raises `Terminated` at the end of the step in progress."""
    from flows.runtime import Terminated

    t = spec.training
    for step in range(done["step"], t.steps):
        t0 = time.perf_counter()
        lr = learning_rate(t, step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        def counted(loss, norm, step=step, lr=lr) -> None:
            done["step"] = step + 1
            # what an interrupt before this step's metrics are complete logs for it
            done["unlogged"] = ({"loss": float(loss), "grad_norm": float(norm), "lr": lr}, step + 1)

        loss, norm, solved = _train_step(model, optimizer, train_data, t, t.seed, step,
                                         updated=counted)  # fmt: skip
        seconds = time.perf_counter() - t0
        metrics = {
            "loss": float(loss.detach()),
            "grad_norm": float(norm),
            "step_seconds": seconds,
            "lr": lr,
        }
        if solved is not None:
            metrics.update(_expert_metrics(solved, seconds, model.executor))
        done["times"].append((seconds, metrics.get("expert_seconds")))
        if not math.isfinite(metrics["loss"]):
            raise UserError(
                f"training diverged at step {step + 1}: loss is {metrics['loss']}"
                f" (lower training.lr or raise constraint.ridge)"
            )
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            run.log_metrics(metrics, step=step + 1)
            done["unlogged"] = None
        else:  # logged should the run stop here
            done["unlogged"] = (metrics, step + 1)
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
            checkpoint(step + 1, run.run_id)
        if progress:
            progress(step + 1, t.steps, metrics["loss"])
        if stop_requested() and step + 1 < t.steps:
            raise Terminated(f"terminated after step {step + 1}")


def _train_step(model, optimizer, train_data, t: TrainingSpec, seed: int, step: int,
                grad_clip: float | None = None, updated=None):  # fmt: skip
    """One optimiser step on the batch and collocation points of (seed, step) -> (loss,
    gradient norm, the experts' record); `updated(loss, norm)` is called with the update, neither
    interrupted between them."""
    import torch

    from flows.runtime import interrupts_deferred

    initial, generator = step_batch(train_data, t.batch_size, seed, step)
    loss, _, solved = model.loss(initial, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or t.grad_clip)
    with interrupts_deferred():
        optimizer.step()
        if updated is not None:
            updated(loss.detach(), norm)
    return loss, norm, solved


def step_batch(train_data, batch_size: int, seed: int, step: int):
    """The initial conditions (B, *space) float32 and the collocation points' generator of
    step `step`: a function of (seed, step) only."""
    import torch

    n = len(train_data)
    rng = np.random.default_rng([seed, step])
    index = rng.choice(n, size=min(batch_size, n), replace=False)
    initial = torch.from_numpy(np.ascontiguousarray(train_data[index][:, 0])).float()
    return initial, torch.Generator().manual_seed(int(rng.integers(2**62)))


def _expert_metrics(solved, step_seconds: float, executor) -> dict[str, float]:
    d = solved.diagnostics
    n = max(len(d), 1)
    experts = solved.seconds + getattr(executor, "last_vjp_seconds", 0.0)  # solve + backward
    return {
        "lm_iterations": sum(x.get("iterations_mean", 0.0) for x in d) / n,
        "converged_share": sum(x.get("converged_fraction", 0.0) for x in d) / n,
        # solves that stopped on a non-finite or unsolvable system (not merely at the
        # iteration cap, which converged_share counts), and backward problems whose
        # gradient was zeroed because H was singular: counted, never hidden
        "lm_failures": sum(x.get("nonfinite", 0.0) + x.get("singular", 0.0) for x in d),
        "ift_zeroed": float(getattr(executor, "last_vjp_zeroed", 0)),
        "expert_seconds": experts,
        "other_seconds": max(step_seconds - experts, 0.0),
        "expert_restarts": float(getattr(executor, "restarts", 0)),
    }


def _logged_model(run_id: str) -> str | None:
    """The URI of the model a run logged last (models:/m-...), or None."""
    import mlflow

    experiment = mlflow.get_run(run_id).info.experiment_id
    found = mlflow.search_logged_models(
        experiment_ids=[experiment],
        filter_string=f"source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_time", "ascending": True}],
        output_format="list",
    )
    return f"models:/{found[-1].model_id}" if found else None


def _log_model(run, model, problem: Problem, spec: TrainSpec) -> tuple[str | None, str | None]:
    """Log with mlflow.pytorch (signature + input example) and register it."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    sample = problem.dataset.arrays("test")[problem.field][:1]  # (1, nt, *space)
    initial = torch.from_numpy(np.ascontiguousarray(sample[:, 0])).float()
    with torch.no_grad():
        output = model(initial).cpu().numpy()
    signature = infer_signature(initial.numpy(), output)
    name = spec.register_as or spec.name
    # Pickle is chosen on purpose (see below); MLflow's warning about it is noise here.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=signature,
        input_example=initial.numpy(),
        registered_model_name=name,
        # The model carries the code it unpickles into (the `actors` package: torch, numpy
        # and scipy only), so it loads and serves without physflow installed.
        code_paths=[str(Path(actors.__file__).parent)],
        pip_requirements=model_requirements(),
        # The LM solve inside forward cannot be traced by torch.export: keep the module.
        serialization_format="pickle",
    )
    return info.model_uri, name


def model_requirements() -> list[str]:
    """What a logged model needs besides its own code: the versions it was trained with
    (torch's local build tag, such as +cpu, left out: any build of that version loads it)."""
    from importlib.metadata import version

    return [
        f"{package}=={version(package).split('+')[0]}" for package in ("torch", "numpy", "scipy")
    ]


# One step at a time: the `pde` trainable of population-based training ---------------------


PBT_HPARAMS = ("lr", "damping", "ridge", "collocation_points", "grad_clip")


class StepTrainer:
    """The trainer of `physflow train`, driven one step at a time with hyperparameters that
    may change between steps (the PBT trainable contract, actors.pbt.trainable).

    Hyperparameters: `lr` (the base rate; the spec's warm-up and halving still apply),
    `damping` (LM's initial damping, sent to the experts), `ridge` (the experts' ridge
    rows), `collocation_points` (per expert), `grad_clip`. Batches and collocation points
    come from (seed, step), and the seed is part of the state, so a member that loads a
    donor's state continues exactly as the donor would have. `evaluate` scores the first
    `eval_samples` test samples (`test_rel_l2`)."""

    def __init__(self, spec: TrainSpec, storage: Storage, seed: int, eval_samples: int = 4):
        import torch

        self.spec, self.seed, self.step_, self.eval_samples = spec, seed, 0, eval_samples
        self.problem = open_problem(spec, storage)
        self.train_data = self.problem.dataset.arrays("train")[self.problem.field]
        torch.manual_seed(seed)
        self.net = build_model(spec, self.problem)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=spec.training.lr)
        self.damping = spec.constraint.damping
        if spec.experts.executor == "ray" and self.net.num_experts > 0:
            from actors.experts import RayExperts

            self.net.executor = RayExperts(
                self.net.expert_config(),
                self.net.num_experts,
                spec.experts.gpus_per_expert,
                spec.experts.cpus_per_expert,
            )
        self._restarts_seen = 0

    def step(self, hparams: dict[str, Any]) -> dict[str, float]:
        t = self.spec.training
        self._apply(hparams)
        t0 = time.perf_counter()
        grad_clip = float(hparams.get("grad_clip", t.grad_clip))
        loss, norm, solved = _train_step(
            self.net, self.optimizer, self.train_data, t, self.seed, self.step_, grad_clip
        )
        self.step_ += 1
        metrics = {
            "loss": float(loss.detach()),
            "grad_norm": float(norm),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if solved is not None:
            seconds = time.perf_counter() - t0
            metrics.update(_expert_metrics(solved, seconds, self.net.executor))
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"training diverged at step {self.step_}: loss is nan/inf")
        return metrics

    def _apply(self, hparams: dict[str, Any]) -> None:
        """Set this step's hyperparameters on the optimiser, the model and the experts."""
        import dataclasses

        t = self.spec.training
        lr = learning_rate(t, self.step_, float(hparams.get("lr", t.lr)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if "collocation_points" in hparams:
            self.net.collocation_points = int(hparams["collocation_points"])
        if "ridge" in hparams and hasattr(self.net.constraint, "ridge"):
            ridge = float(hparams["ridge"])
            self.net.constraint = dataclasses.replace(self.net.constraint, ridge=ridge)
            self.net.pde_parameters["ridge"] = ridge
        if "damping" in hparams:
            self._set_damping(float(hparams["damping"]))

    def _set_damping(self, damping: float) -> None:
        """LM's initial damping lives in each expert's config; a restarted expert actor
        comes back with the original, so it is sent again after a restart."""
        import dataclasses

        executor = self.net._executor() if self.net.num_experts else None
        restarts = getattr(executor, "restarts", 0)
        if damping == self.damping and restarts == self._restarts_seen:
            return
        self.damping, self._restarts_seen = damping, restarts
        options = dataclasses.replace(self.net.options, initial_damping=damping)
        self.net.options = options
        if executor is None:
            return
        config = dataclasses.replace(executor.config, options=options)
        executor.config = config
        if hasattr(executor, "solvers"):  # in-process
            for solver in executor.solvers:
                solver.config = config
        else:  # Ray actors
            import ray

            ray.get([a.__ray_call__.remote(_set_expert_config, config) for a in executor.actors])

    def evaluate(self) -> dict[str, float]:
        errors, _ = evaluate(
            self.net,
            self.problem.dataset,
            self.problem.field,
            self.spec.eval_batch_size,
            limit=self.eval_samples,
        )
        return {"test_rel_l2": float(errors[: self.eval_samples].mean())}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_, self.seed = int(state["step"]), int(state["seed"])

    def model(self):
        return self.net

    def placement_groups(self) -> list[Any]:
        group = getattr(self.net.executor, "group", None)
        return [group] if group is not None else []

    def close(self) -> None:
        if self.net.executor is not None:
            self.net.executor.close()
            self.net.executor = None


def _set_expert_config(actor, config) -> None:
    """Runs inside an expert actor (`__ray_call__`): new solver options, same actor."""
    actor.solver.config = config


def pbt_trainable(seed: int, options: dict[str, Any]) -> StepTrainer:
    """The `pde` trainable: options = {"train": a TrainSpec as data, "storage": root URL,
    "eval_samples": test samples scored at each ready point}."""
    spec = TrainSpec.model_validate(options["train"])
    storage = Storage.at(options["storage"])
    heap.use_in_this_process()  # the member's process drives its experts as `train` does
    return StepTrainer(spec, storage, seed, int(options.get("eval_samples", 4)))
