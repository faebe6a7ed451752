"""`physflow pbt`: population-based training of any trainable, from spec to winner.

    spec ─► search space, strategy, trainable ─► Population (actors.pbt) on Ray
      members = Ray actors, each a trainer kept alive; PDE members own their experts
      ready point ─► rank ─► exploit (copy weights + hyperparameters) ─► explore
      every round ─► checkpoints + state.json in <storage>/pbt/<name>/       [storage]
      MLflow runs, lineage.json + lineage.png, the winner's model  [flows.pbt_tracking]

Strategies share the loop and the budget (members × steps): `pbt`, `random` (fixed
hyperparameters drawn from the priors), `grid`, `explore_only`, `exploit_only`.
`physflow pbt replay` (flows.pbt_replay) trains one member's schedule again.
Why a purpose-built controller rather than Ray Tune: see actors/pbt/__init__.py.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from flows.datasets import NAME_PATTERN
from flows.errors import JobFailure, UserError
from flows.pbt_tracking import Tracker, lineage_document, log_artifacts, register_winner
from flows.spec import Spec
from flows.storage import Storage
from flows.train import PBT_HPARAMS, TrainSpec

BUILTIN = {"toy": "actors.pbt.toy:build", "pde": "flows.train:pbt_trainable"}


class ParamSpec(Spec):
    """One hyperparameter: its prior and bounds, and how explore moves it."""

    prior: Literal["uniform", "log_uniform", "int_uniform", "log_int_uniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[float | int | str] | None = None
    perturb: Literal["factors", "noise"] = Field(
        "factors", description="multiply by one of `factors`, or add N(0, noise)"
    )
    factors: list[float] = Field([0.8, 1.2], min_length=1)
    noise: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> ParamSpec:
        if self.prior == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty list of values")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.prior} prior needs low and high")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low and high must be finite, got [{self.low}, {self.high}]")
        if not self.low < self.high:
            raise ValueError(f"empty range: low {self.low:g} must be below high {self.high:g}")
        if self.prior.startswith("log") and self.low <= 0:
            raise ValueError(f"a log scale needs bounds above 0, got low {self.low:g}")
        if self.prior in ("int_uniform", "log_int_uniform"):
            if math.ceil(self.low) > math.floor(self.high):
                raise ValueError(f"no integer in [{self.low:g}, {self.high:g}]")
        if any(f <= 0 for f in self.factors):
            raise ValueError(f"factors must be positive, got {self.factors}")
        return self


class ExploitSpec(Spec):
    method: Literal["truncation", "tournament"] = "truncation"
    quantile: float = Field(0.2, gt=0, le=0.5, description="truncation: bottom/top share")


class ExploreSpec(Spec):
    resample_probability: float = Field(0.25, ge=0, le=1)


class ResourcesSpec(Spec):
    member_cpus: float | None = Field(None, ge=0, le=64, description="default: a share")
    member_gpus: float = Field(0.0, ge=0, le=8)
    expert_cpus: float | None = Field(None, gt=0, le=64)
    expert_gpus: float | None = Field(None, ge=0, le=8)


class FaultsSpec(Spec):
    max_member_restarts: int = Field(2, ge=0, le=100)
    member_timeout_s: float | None = Field(None, gt=0)


class PbtSpec(Spec):
    name: str = Field(pattern=NAME_PATTERN, description="search name; storage folder")
    experiment: str | None = Field(None, description="MLflow experiment (default: name)")
    trainable: str = Field("toy", description="toy, pde, or module:function")
    options: dict[str, Any] = Field({}, description="passed to the trainable")
    train: TrainSpec | None = Field(None, description="the pde trainable's training spec")
    eval_samples: int = Field(4, ge=1, description="pde: test samples scored per ready point")
    strategy: Literal["pbt", "random", "grid", "explore_only", "exploit_only"] = "pbt"
    population: int = Field(4, ge=1, le=4096)
    initial: list[dict[str, float | int | str]] = Field(
        [], description="starting hyperparameters of the first members (rest drawn)"
    )
    steps_per_member: int = Field(40, ge=1)
    ready_interval_steps: int = Field(4, ge=1)
    synchronous: bool = True
    metric: str = Field(min_length=1)
    mode: Literal["max", "min"] = "max"
    exploit: ExploitSpec = ExploitSpec()
    explore: ExploreSpec = ExploreSpec()
    search_space: dict[str, ParamSpec]
    seed: int = Field(0, ge=0)
    resources: ResourcesSpec = ResourcesSpec()
    faults: FaultsSpec = FaultsSpec()
    register_as: str | None = Field(None, description="registered model (default: name)")

    @field_validator("search_space")
    @classmethod
    def _space(cls, value: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not value:
            raise ValueError("empty; name at least one hyperparameter")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PbtSpec:
        if len(self.initial) > self.population:
            raise ValueError(
                f"initial: {len(self.initial)} entries for a population of {self.population}"
            )
        for i, point in enumerate(self.initial):
            for key, value in point.items():
                if key not in self.search_space:
                    raise ValueError(f"initial[{i}].{key}: not in search_space")
                p = self.search_space[key]
                if p.prior == "choice":
                    if value not in p.values:
                        raise ValueError(f"initial[{i}].{key}: {value!r} not in {p.values}")
                    continue
                try:  # YAML reads 1e-3 (no dot) as a string; the search reads it as 0.001
                    number = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"initial[{i}].{key}: {value!r} is not a number") from None
                if not p.low <= number <= p.high:  # it would be moved in without a word
                    raise ValueError(
                        f"initial[{i}].{key}: {value!r} outside search_space.{key}'s "
                        f"[{p.low:g}, {p.high:g}]"
                    )
        if self.ready_interval_steps > self.steps_per_member:
            raise ValueError(
                f"ready_interval_steps {self.ready_interval_steps} exceeds "
                f"steps_per_member {self.steps_per_member}"
            )
        if self.trainable == "pde":
            if self.train is None:
                raise ValueError("train: required by the pde trainable (a physflow train spec)")
            if self.train.training.device == "cuda":
                raise ValueError(
                    "train.training.device: cuda is not supported for population members "
                    "yet (they train on the CPU; their experts can still take GPUs)"
                )
            for key in self.search_space:
                if key not in PBT_HPARAMS:
                    raise ValueError(
                        f"search_space.{key}: the pde trainable has no hyperparameter {key!r} "
                        f"(known: {', '.join(PBT_HPARAMS)})"
                    )
        elif self.train is not None:
            raise ValueError(f"train: only for the pde trainable, not {self.trainable!r}")
        return self

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

    def budget_steps(self) -> int:
        return self.population * self.steps_per_member


@dataclass
class PbtResult:
    run_id: str
    experiment: str
    winner: int
    score: float
    metric: str
    steps: int  # per member
    steps_trained: int  # by this invocation, all members
    members_failed: int
    exploits: int
    seconds: float
    overhead_fraction: float
    resumed_from: int | None
    model_uri: str | None
    registered: str | None
    lineage: dict[str, Any]


# The search space and the starting points -----------------------------------------------


def search_space(spec: PbtSpec):
    from actors.pbt import Param, SearchSpace

    return SearchSpace(
        tuple(
            Param(
                name=name,
                prior=p.prior,
                low=p.low,
                high=p.high,
                values=tuple(p.values or ()),
                perturb=p.perturb,
                factors=tuple(p.factors),
                noise=p.noise,
            )
            for name, p in spec.search_space.items()
        )
    )


def starting_points(spec: PbtSpec, space, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Each member's first hyperparameters. `random` draws all from the priors; `grid`
    takes `initial` or else a grid over the space; the others take `initial` for the
    first members and draw the rest."""
    n = spec.population
    if spec.strategy == "random":
        return [space.sample(rng) for _ in range(n)]
    if spec.strategy == "grid" and not spec.initial:
        return space.grid(n)
    given = list(spec.initial) + [{}] * (n - len(spec.initial))
    if spec.strategy == "grid":
        fill = space.grid(n)
        return [space.complete({**fill[i], **given[i]}, rng) for i in range(n)]
    return [space.complete(g, rng) for g in given]


def member_seed(spec: PbtSpec, member: int) -> int:
    return spec.seed * 1000 + member


# The trainable ---------------------------------------------------------------------------


def resolve_trainable(spec: PbtSpec, storage: Storage) -> tuple[Callable, dict[str, Any]]:
    """The builder function and its options; a user's `module:function` is imported and
    built once here, so that a wrong name or contract fails before any actor starts."""
    from actors.pbt.trainable import check_trainer, import_builder

    target = BUILTIN.get(spec.trainable, spec.trainable)
    if spec.trainable not in BUILTIN and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: a module in this folder
    try:
        builder = import_builder(target)
    except LookupError as exc:
        raise UserError(f"trainable {spec.trainable!r}: {exc}") from None
    if spec.trainable not in BUILTIN:
        # The user's module travels with the members (its own imports must be installed
        # where they run), so a module in the current folder works on a cluster too.
        from ray import cloudpickle  # Ray's own copy pickles the actors' arguments

        cloudpickle.register_pickle_by_value(sys.modules[builder.__module__])
    if spec.trainable == "pde":
        from flows.train import build_model, open_problem

        # a missing data set, one of another PDE, a model it cannot hold: refused here, as
        # `physflow train` would, not by every member in turn
        build_model(spec.train, open_problem(spec.train, storage))
        options = {
            "train": spec.train.resolved(),
            "storage": storage.url,
            "eval_samples": spec.eval_samples,
        }
        return builder, options
    known = getattr(builder, "hyperparameters", None)
    for key in spec.search_space if known is not None else ():
        if key not in known:
            raise UserError(
                f"search_space.{key}: the {spec.trainable} trainable has no hyperparameter "
                f"{key!r} (known: {', '.join(known)})"
            )
    options = dict(spec.options)
    try:
        trainer = builder(member_seed(spec, 0), options)
        check_trainer(trainer, spec.trainable)
        # One throw-away step: a report without the metric is a spec mistake, found here
        # rather than after the members have started.
        space = search_space(spec)
        first = starting_points(spec, space, np.random.default_rng([spec.seed, 1]))[0]
        report = trainer.step(dict(first))
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"trainable {spec.trainable!r}: {exc}") from None
    if spec.metric not in report and not hasattr(trainer, "evaluate"):
        raise UserError(
            f"metric: {spec.metric!r} is not in the trainable's report "
            f"(it reports: {', '.join(sorted(report)) or 'nothing'})"
        )
    close = getattr(trainer, "close", None)
    if close is not None:
        close()
    return builder, options


def pde_experts(spec: PbtSpec) -> int:
    """Expert actors per member: 0 unless a PDE trainable runs its experts on Ray."""
    t = spec.train
    if t is None or t.experts.executor != "ray" or t.model.kind == "sc":
        return 0
    return math.prod(t.model.splits) if t.model.kind == "moe" else 1


def plan_resources(spec: PbtSpec, options: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) per member actor, and for a PDE population the experts' bundle, so that
    every member and its experts fit on the cluster at once."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 1.0), total.get("GPU", 0.0)
    r, n, experts = spec.resources, spec.population, pde_experts(spec)
    share = 2 * n if experts else n
    member_cpus = r.member_cpus if r.member_cpus is not None else min(1.0, cpus / share)
    if experts:
        left = max(cpus - n * member_cpus, 0.0)
        expert_cpus = r.expert_cpus or min(1.0, left / (n * experts))
        if expert_cpus <= 0:
            raise UserError(
                f"resources: no CPU left for the experts of {n} members on {cpus:g} CPUs "
                f"(lower resources.member_cpus or population)"
            )
        expert_gpus = r.expert_gpus
        if expert_gpus is None:
            expert_gpus = min(1.0, gpus / (n * experts)) if gpus else 0.0
        train = dict(options["train"])
        train["experts"] = {
            **train["experts"],
            "cpus_per_expert": _down(expert_cpus),
            "gpus_per_expert": _down(expert_gpus),
        }
        options["train"] = train
    # Ray would wait for such a bundle for ever: refuse it (the same count across nodes
    # is enough to say no; placement across them is Ray's)
    wanted = n * r.member_gpus + (n * experts * float(r.expert_gpus or 0))
    if wanted > gpus + 1e-9:
        raise UserError(
            f"resources: {n} members want {wanted:g} GPUs in all, and the Ray cluster has "
            f"{gpus:g} (lower resources.member_gpus or resources.expert_gpus)"
        )
    return _down(member_cpus), r.member_gpus


def _down(share: float) -> float:
    """A share of a resource to 4 decimals, rounded down: 3 members of 2/3 CPU rounded to
    0.6667 want 2.0001 CPUs of 2, and the third would wait for ever."""
    return math.floor(share * 10_000) / 10_000


# The job -----------------------------------------------------------------------------------


def build_population(spec: PbtSpec, storage: Storage, listener=None, trainable=None):
    """The spec's population (inside a Ray session): space, trainable, starting points,
    resources. `run_pbt` adds MLflow and resume; benchmarks drive it bare."""
    from actors.pbt import Population, PopulationConfig

    space = search_space(spec)
    builder, options = trainable or resolve_trainable(spec, storage)
    initial = starting_points(spec, space, np.random.default_rng([spec.seed, 1]))
    member_cpus, member_gpus = plan_resources(spec, options)
    config = PopulationConfig(
        size=spec.population,
        steps=spec.steps_per_member,
        ready_steps=spec.ready_interval_steps,
        metric=spec.metric,
        mode=spec.mode,
        strategy=spec.strategy,
        exploit=spec.exploit.method,
        quantile=spec.exploit.quantile,
        resample_probability=spec.explore.resample_probability,
        synchronous=spec.synchronous,
        seed=spec.seed,
        max_member_restarts=spec.faults.max_member_restarts,
        member_timeout_s=spec.faults.member_timeout_s,
        member_cpus=member_cpus,
        member_gpus=member_gpus,
    )
    seeds = [member_seed(spec, m) for m in range(spec.population)]
    folder = storage.join("pbt", spec.name)
    return Population(config, space, builder, options, storage, folder, initial, seeds, listener)


def _resumable_digest(spec: PbtSpec) -> str:
    """Everything but the step budget must match for a search to be continued."""
    return spec.model_copy(update={"steps_per_member": 0}).digest()


def run_pbt(
    spec: PbtSpec,
    storage: Storage | None = None,
    resume: bool = False,
    progress: Callable[[int, int, float | None], None] | None = None,
    ray_address: str | None = None,
) -> PbtResult:
    """Run (or with `resume`, continue) the search; returns the winner and where to look."""
    from flows.lease import Lease

    storage = storage or Storage.from_env()
    # one job at a time runs a search: a second is refused before it reads anything
    with Lease(storage, ("pbt", spec.name), f"search {spec.name!r}") as lease:
        return _run_pbt(spec, storage, resume, lease.guarding(progress), ray_address)


def _run_pbt(spec: PbtSpec, storage: Storage, resume: bool, progress, ray_address) -> PbtResult:
    from actors.pbt import MetricMissing, PopulationFailed
    from flows import tracking
    from flows.runtime import (
        ray_is_ending,
        ray_session,
        reporting_stops,
        sigterm_requests_stop,
    )

    t_start = time.perf_counter()
    folder = storage.join("pbt", spec.name)
    state_path = storage.join("pbt", spec.name, "state.json")
    trainable = resolve_trainable(spec, storage)  # a wrong name fails before anything else
    state = storage.read_json(state_path) if storage.exists(state_path) else None
    digest = _resumable_digest(spec)
    if state is not None and not resume:
        from actors.pbt import Lineage

        step = min(m.step for m in Lineage.from_json(state["lineage"]).members)
        raise UserError(
            f"search {spec.name!r} already has a state at step {step} in {folder}; "
            f"continue it with --resume, or choose another name"
        )
    if resume and state is None:
        raise UserError(f"--resume: search {spec.name!r} has no state in {folder}")
    if state is not None and state["extra"].get("digest") != digest:
        raise UserError(
            f"--resume: search {spec.name!r} was started from a different spec; only "
            f"steps_per_member may change when resuming"
        )

    parent_id = state["extra"]["parent_run_id"] if state else None
    with (
        tracking.job_run(spec.experiment_name, spec.name, spec.resolved(), parent_id) as run,
        # as Ctrl-C: the state of the last round is kept
        sigterm_requests_stop(interrupt=True) as terminated,
        ray_session(ray_address),
    ):
        run.set_tags({"physflow.job": "pbt", "trainable": spec.trainable,
                      "strategy": spec.strategy})  # fmt: skip
        population = build_population(spec, storage, trainable=trainable)

        report = reporting_stops(progress, terminated)  # called after each committed round
        tracker = Tracker(run, spec, population.space, digest, report)
        population.listener = tracker
        if state is not None:
            population.restore(state)
        tracker.open_members(
            population.lineage,
            population.hparams,
            state["extra"].get("member_runs", {}) if state else {},
        )
        try:
            population.start()
            lineage = population.run()
            winner = lineage.winner()
            if winner is None:
                raise JobFailure(f"search {spec.name!r}: no member reported a score")
            model_uri, registered = register_winner(spec, storage, population, tracker, winner)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the members' runs end with the parent's
            tracker.stopped()
            raise
        except MetricMissing as exc:
            raise UserError(f"metric: {exc}") from None
        except PopulationFailed as exc:
            raise JobFailure(f"search {spec.name!r}: {exc}") from None
        finally:
            if not ray_is_ending():  # its actors end with this process's lost Ray
                population.close()
        tracker.finish(lineage)
        overhead = overhead_fraction(population.timing)
        data = lineage_document(spec, lineage, tracker.runs)
        log_artifacts(run, spec, lineage, data)
        run.log_metrics(
            {
                "best_score": winner["score"],
                "winner": winner["member"],
                "exploits": len(lineage.exploits),
                "members_failed": sum(m.status == "failed" for m in lineage.members),
                "steps_total": spec.budget_steps(),
                "overhead_fraction": overhead,
                "wall_seconds": population.timing.wall_seconds,
            },
            step=spec.steps_per_member,
        )
        run.set_tags({"winner_run_id": tracker.runs[winner["member"]]})
    return PbtResult(
        run_id=run.run_id,
        experiment=spec.experiment_name,
        winner=winner["member"],
        score=winner["score"],
        metric=spec.metric,
        steps=spec.steps_per_member,
        steps_trained=population.timing.steps_trained,
        members_failed=sum(m.status == "failed" for m in lineage.members),
        exploits=len(lineage.exploits),
        seconds=time.perf_counter() - t_start,
        overhead_fraction=overhead,
        resumed_from=population.resumed_from,
        model_uri=model_uri,
        registered=registered,
        lineage=data,
    )


def overhead_fraction(timing) -> float:
    """The share of the population's wall time its members spent outside training steps
    (waiting at barriers, evaluating, saving, copying, scheduling)."""
    if timing.wall_seconds <= 0 or not timing.step_seconds:
        return 0.0
    busy = sum(timing.step_seconds.values()) / len(timing.step_seconds)
    return max(0.0, 1.0 - busy / timing.wall_seconds)
