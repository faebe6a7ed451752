"""`physflow pbt`: population-based training of any trainable, its lineage in MLflow.

    spec ─► search space, strategy, trainable ─► Population (actors.pbt) on Ray
      members = Ray actors, each a trainer kept alive; PDE members own their experts
      ready point ─► rank ─► exploit (copy weights + hyperparameters) ─► explore
      every round ─► checkpoints + state.json in <storage>/pbt/<name>/       [storage]
      parent run + one nested run per member; hyperparameters as metrics     [MLflow]
      lineage.json + lineage.png; the winner's model registered

Strategies share the loop and the budget (members × steps): `pbt`, `random` (fixed
hyperparameters drawn from the priors), `grid`, `explore_only`, `exploit_only`.
`replay` trains one member's schedule again from its lineage, in this process.
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
            for key in point:
                if key not in self.search_space:
                    raise ValueError(f"initial[{i}].{key}: not in search_space")
        if self.ready_interval_steps > self.steps_per_member:
            raise ValueError(
                f"ready_interval_steps {self.ready_interval_steps} exceeds "
                f"steps_per_member {self.steps_per_member}"
            )
        if self.trainable == "pde":
            if self.train is None:
                raise ValueError("train: required by the pde trainable (a physflow train spec)")
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
        options = {
            "train": spec.train.resolved(),
            "storage": storage.url,
            "eval_samples": spec.eval_samples,
        }
        return builder, options
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


def _pde_experts(spec: PbtSpec) -> int:
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
    r, n, experts = spec.resources, spec.population, _pde_experts(spec)
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
            "cpus_per_expert": round(expert_cpus, 4),
            "gpus_per_expert": round(expert_gpus, 4),
        }
        options["train"] = train
    return round(member_cpus, 4), r.member_gpus


# MLflow: parent run, one nested run per member -------------------------------------------


class Tracker:
    """The controller's events as MLflow records. Params cannot change, so each
    hyperparameter is also a metric `hp.<name>` over steps (its schedule); an exploit is a
    tag on the member's run and a row of the parent's exploits.json."""

    def __init__(self, parent, spec: PbtSpec, space, digest: str, progress=None):
        import mlflow

        self.digest = digest
        self.client = mlflow.MlflowClient()
        self.parent, self.spec, self.space, self.progress = parent, spec, space, progress
        self.experiment_id = mlflow.get_run(parent.run_id).info.experiment_id
        self.runs: dict[int, str] = {}
        # Records wait here and go out in one batch per run when the controller commits
        # its state (every few seconds), so that MLflow and the resume state agree.
        self.metrics: dict[str, list] = {}
        self.tags: dict[str, dict[str, str]] = {}

    def open_members(self, lineage, hparams: dict[int, dict], known: dict[str, str]) -> None:
        for record in lineage.members:
            m = record.member
            if str(m) in known:
                self.runs[m] = known[str(m)]
                self.client.update_run(self.runs[m], status="RUNNING")
                continue
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"member-{m}",
                tags={"mlflow.parentRunId": self.parent.run_id, "physflow.member": str(m)},
            )
            self.runs[m] = run.info.run_id
            params = {f"hp.{k}": str(v) for k, v in hparams[m].items()}
            params.update({"seed": str(record.seed), "member": str(m)})
            self.client.log_batch(self.runs[m], params=_params(params))

    def _log(self, run_id: str, values: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.metrics.setdefault(run_id, []).extend(
            Metric(k, float(v), now, s) for k, v, s in values if math.isfinite(float(v))
        )

    def _tag(self, run_id: str, key: str, value: str) -> None:
        self.tags.setdefault(run_id, {})[key] = value[:5000]

    def flush(self) -> None:
        from mlflow.entities import RunTag

        for run_id in sorted(set(self.metrics) | set(self.tags)):
            metrics = self.metrics.pop(run_id, [])
            tags = [RunTag(k, v) for k, v in self.tags.pop(run_id, {}).items()]
            for i in range(0, max(len(metrics), 1), 1000):
                self.client.log_batch(run_id, metrics=metrics[i : i + 1000], tags=tags)
                tags = []

    def hp_value(self, name: str, value: Any) -> float:
        if isinstance(value, str):
            return float(self.space[name].values.index(value))
        return float(value)

    def on_segment(self, m: int, segment, report: dict[str, Any]) -> None:
        rows = []
        for i, metrics in enumerate(report["history"]):
            step = segment.start + i + 1
            rows += [(k, v, step) for k, v in metrics.items()]
            rows += [(f"hp.{k}", self.hp_value(k, v), step) for k, v in segment.hparams.items()]
        last = report["history"][-1] if report["history"] else {}
        rows += [(k, v, segment.end) for k, v in report["metrics"].items() if k not in last]
        rows.append(("score", segment.score, segment.end))
        self._log(self.runs[m], rows)

    def on_exploit(self, record: dict[str, Any]) -> None:
        m, step = record["member"], record["step"]
        changes = "; ".join(
            f"{k} {record['old'][k]!r} -> {record['new'][k]!r} ({record['ops'].get(k, 'copy')})"
            for k in record["new"]
        )
        text = f"copied member {record['donor']} at its step {record['donor_step']}: {changes}"
        self._tag(self.runs[m], f"exploit.step-{step:07d}", text)
        self._log(self.runs[m], [("exploit.donor", record["donor"], step), ("exploited", 1, step)])

    def on_failure(self, m: int, reason: str) -> None:
        self._tag(self.runs[m], "failure", reason)
        self.flush()
        self.client.set_terminated(self.runs[m], status="FAILED")

    def on_restart(self, m: int, reason: str) -> None:
        self._tag(self.runs[m], f"restart.{int(time.time())}", reason)

    def on_progress(self, done: int, total: int, best: float | None) -> None:
        if best is not None and math.isfinite(best):
            step = done // max(self.spec.population, 1)
            self._log(self.parent.run_id, [("best_score", best, step)])
        if self.progress:
            self.progress(done, total, best)

    def extra_state(self) -> dict[str, Any]:
        return {
            "parent_run_id": self.parent.run_id,
            "member_runs": self.runs,
            "digest": self.digest,
        }

    def finish(self, lineage) -> None:
        for record in lineage.members:
            score = record.segments[-1].score if record.segments else None
            if record.status != "failed" and score is not None and math.isfinite(score):
                self._log(self.runs[record.member], [("final_score", score, record.step)])
        self.flush()
        for record in lineage.members:
            if record.status != "failed":
                self.client.set_terminated(self.runs[record.member], status="FINISHED")


def _params(params: dict[str, str]):
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in params.items()]


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
    from actors.pbt import MetricMissing, PopulationFailed
    from flows import tracking
    from flows.runtime import ray_session

    storage = storage or Storage.from_env()
    t_start = time.perf_counter()
    folder = storage.join("pbt", spec.name)
    state_path = storage.join("pbt", spec.name, "state.json")
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

    trainable = resolve_trainable(spec, storage)  # a wrong name fails before any run
    parent_id = state["extra"]["parent_run_id"] if state else None
    with (
        tracking.job_run(spec.experiment_name, spec.name, spec.resolved(), parent_id) as run,
        ray_session(ray_address),
    ):
        run.set_tags({"physflow.job": "pbt", "trainable": spec.trainable,
                      "strategy": spec.strategy})  # fmt: skip
        population = build_population(spec, storage, trainable=trainable)
        tracker = Tracker(run, spec, population.space, digest, progress)
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
            model_uri, registered = _register(spec, storage, population, tracker, winner)
        except MetricMissing as exc:
            raise UserError(f"metric: {exc}") from None
        except PopulationFailed as exc:
            raise JobFailure(f"search {spec.name!r}: {exc}") from None
        finally:
            population.close()
        tracker.finish(lineage)
        overhead = overhead_fraction(population.timing)
        data = lineage_document(spec, lineage, tracker.runs)
        _log_artifacts(run, spec, lineage, data)
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


def lineage_document(spec: PbtSpec, lineage, runs: dict[int, str]) -> dict[str, Any]:
    """lineage.json: the lineage plus what replay needs (the spec, the member seeds)."""
    data = lineage.to_json()
    for record in data["members"]:
        record["run_id"] = runs.get(record["member"])
    data["name"] = spec.name
    data["spec"] = spec.resolved()
    return data


def _log_artifacts(run, spec: PbtSpec, lineage, data: dict[str, Any]) -> None:
    from actors.pbt.lineage import draw

    run.log_json(data, "lineage.json")
    run.log_json(lineage.exploits, "exploits.json")
    figure = draw(lineage, title=f"{spec.name}: {spec.strategy}, {spec.metric} ({spec.mode})")
    run.log_figure(figure, "lineage.png")
    import matplotlib.pyplot as plt

    plt.close(figure)


def _register(spec: PbtSpec, storage, population, tracker, winner) -> tuple[str | None, str | None]:
    """The winner's model, logged to its nested run and registered; None if the trainable
    has no `model()` (the toy)."""
    import mlflow

    model = population.model(winner["member"])
    if model is None:
        return None, None
    name = spec.register_as or spec.name
    with mlflow.start_run(run_id=tracker.runs[winner["member"]], nested=True) as active:
        if spec.trainable == "pde":
            from flows.tracking import JobRun
            from flows.train import _log_model, open_problem

            train = spec.train.model_copy(update={"register_as": name})
            problem = open_problem(train, storage)
            return _log_model(JobRun(active.info.run_id, spec.experiment_name), model,
                              problem, train)  # fmt: skip
        info = mlflow.pytorch.log_model(model, name="model", registered_model_name=name)
        return info.model_uri, name


# Replay ------------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    member: int
    steps: int
    segments: int
    score: float
    recorded: float | None
    metric: str
    seconds: float


def load_lineage(source: str) -> dict[str, Any]:
    """A lineage.json path, or the MLflow run id of a search (its parent run)."""
    import os

    if os.path.isfile(source):
        import json

        with open(source) as f:
            return json.load(f)
    from flows import tracking

    tracking.ensure_experiment("pbt-replay")  # sets the tracking URI
    import mlflow

    try:
        return mlflow.artifacts.load_dict(f"runs:/{source}/lineage.json")
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a search"
        raise UserError(
            f"{source!r}: neither a lineage.json file nor the run id of a PBT search "
            f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
        ) from None


def replay(
    source: str,
    member: int | None = None,
    storage: Storage | None = None,
    progress: Callable[[int, int, float | None], None] | None = None,
    ray_address: str | None = None,
) -> ReplayResult:
    """Train `member`'s (default: the winner's) whole schedule again, in this process:
    the root ancestor's seed, then each segment's steps with its hyperparameters."""
    from actors.pbt.lineage import Lineage
    from flows.runtime import ray_session

    data = load_lineage(source)
    spec = PbtSpec.model_validate(data["spec"])
    lineage = Lineage.from_json(data)
    if member is None:
        member = (data.get("winner") or {}).get("member", 0)
    if not 0 <= member < len(lineage.members):
        raise UserError(f"--member {member}: the search has members 0..{len(lineage.members) - 1}")
    storage = storage or Storage.from_env()
    builder, options = resolve_trainable(spec, storage)
    seed, segments = lineage.schedule(member)
    total = segments[-1].end if segments else 0
    t0 = time.perf_counter()
    with ray_session(ray_address, enabled=_pde_experts(spec) > 0):
        trainer = builder(seed, options)
        try:
            final: dict[str, float] = {}
            step = segments[0].start if segments else 0
            for segment in segments:
                while step < segment.end:
                    final = trainer.step(dict(segment.hparams))
                    step += 1
                    if progress:
                        progress(step, total, None)
            final = dict(final)
            evaluate = getattr(trainer, "evaluate", None)
            if evaluate is not None:
                final.update(evaluate())
        finally:
            close = getattr(trainer, "close", None)
            if close is not None:
                close()
    if spec.metric not in final:
        raise UserError(f"metric: {spec.metric!r} is not in the trainable's report")
    recorded = (
        lineage.members[member].segments[-1].score if lineage.members[member].segments else None
    )
    return ReplayResult(
        member=member,
        steps=total,
        segments=len(segments),
        score=float(final[spec.metric]),
        recorded=recorded,
        metric=spec.metric,
        seconds=time.perf_counter() - t0,
    )
