"""`physflow nas`: search the sub-networks of a super-network for the best metric at each
latency and size.

    spec ─► super-network (trained here unless a checkpoint is given) ─► storage, MLflow
        ─► evaluator pool (Ray actors, or in-process) ◄─► strategy (random | nsga2 | linas)
        ─► each validation appended to the results table as it arrives
        ─► Pareto front + hypervolume after every validation (MLflow step = validations)

Layout under `<storage>/runs/<name>/nas/`: `state.json` (run id, spec digest, reference
point), `supernet.pt`, `results/part-NNNNN.jsonl` (100 rows per part; each part rewritten
atomically as a row arrives), `front.csv`, and `export/pick-N.pt` from `physflow nas export`.
`--resume` replays the strategy over the stored rows and validates only what is new.

The hypervolume is that of the objectives divided by a reference point (from the spec, else
1.1 x the worse of the largest and smallest sub-networks, measured on the driver at the start
and then kept), so it lies in [0, 1] and is comparable across steps and resumes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pickle
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from flows.datasets import NAME_PATTERN
from flows.errors import JobFailure, UserError
from flows.spec import Spec, register_tags
from flows.storage import Storage

EXPERIMENT = "nas"
ROWS_PER_PART = 100
register_tags("mlp-digits", "fno")


# Spec ------------------------------------------------------------------------------------


class SupernetTrainingSpec(Spec):
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    lr: float = Field(3e-3, gt=0, lt=1)
    random_per_step: int = Field(2, ge=0, le=64, description="besides largest and smallest")
    seed: int = Field(0, ge=0)


class _SupernetBase(Spec):
    checkpoint: str | None = Field(
        None, description="trained super-network (path under the storage root, or URL)"
    )
    training: SupernetTrainingSpec = SupernetTrainingSpec()


class MLPDigitsSpec(_SupernetBase):
    kind: Literal["mlp-digits"]
    max_depth: int = Field(4, ge=1, le=8)
    widths: list[int] = Field([8, 16, 24, 32, 48, 64, 96], min_length=1)
    split_seed: int = Field(0, ge=0, description="seeds the train/validation/test split")


class FNOSupernetSpec(_SupernetBase):
    kind: Literal["fno"]
    dataset: str = Field(min_length=1)
    dataset_version: str | None = None
    depths: list[int] = Field([1, 2, 3, 4], min_length=1)
    widths: list[int] = Field([8, 16, 24, 32], min_length=1)
    modes: list[int] = Field([4, 6, 8], min_length=1)
    padding: int = Field(4, ge=0, le=256)


class StrategySpec(Spec):
    kind: Literal["random", "nsga2", "linas"] = "linas"
    population: int = Field(
        50, ge=2, le=10_000, description="initial random population; NSGA-II population"
    )
    batch: int = Field(25, ge=1, le=10_000, description="LINAS validations per refit")
    inner_generations: int = Field(50, ge=1, le=10_000, description="LINAS inner NSGA-II")
    seed: int = Field(0, ge=0)


class LatencySpec(Spec):
    batch_size: int = Field(1, ge=1, le=65_536)
    warmup: int = Field(10, ge=0, le=10_000)
    repeats: int = Field(30, ge=3, le=100_000)
    threads: int = Field(1, ge=1, le=256, description="torch threads per evaluator on CPU")


class EvaluatorsSpec(Spec):
    executor: Literal["ray", "local"] = Field("ray", description="Ray actors or in-process")
    actors: int = Field(2, ge=1, le=4096)
    cpus_per_actor: float = Field(1.0, gt=0, le=256)
    gpus_per_actor: float = Field(0.0, ge=0, le=8)
    validation_samples: int | None = Field(
        None, ge=1, description="fixed seeded subset of the validation split (default: all)"
    )
    seed: int = Field(0, ge=0)
    latency: LatencySpec = LatencySpec()


class NASSpec(Spec):
    name: str = Field(pattern=NAME_PATTERN, description="run name; results are kept under it")
    supernet: Annotated[MLPDigitsSpec | FNOSupernetSpec, Field(discriminator="kind")]
    space: dict[str, list[int]] = Field(
        default_factory=dict, description="variable -> allowed subset of its choices"
    )
    objectives: list[str] = Field(["error", "latency_ms"], min_length=2, max_length=3)
    strategy: StrategySpec = StrategySpec()
    budget: int = Field(200, ge=1, description="sub-networks to validate")
    evaluators: EvaluatorsSpec = EvaluatorsSpec()
    reference_point: dict[str, float] = Field(
        default_factory=dict, description="objective -> worst value counted by the hypervolume"
    )


@dataclass
class NASResult:
    run_id: str
    folder: str
    validated: int  # rows in the results table
    new: int  # validated by this run of the job
    replayed: int  # strategy asks answered from the table
    failed: int
    hypervolume: float
    front: list[dict[str, Any]]
    objectives: list[str]
    seconds: float
    stopped: str


# Building the super-network and its data ------------------------------------------------


@dataclass
class Problem:
    """The super-network (untrained until trained or loaded) and its data splits."""

    net: Any
    train: tuple[Any, Any]
    validation: tuple[Any, Any]
    source: str


def open_problem(spec: NASSpec, storage: Storage) -> Problem:
    import torch

    from actors.nas import ElasticFNO, ElasticMLP, digits_splits, surrogate_pairs

    torch.manual_seed(spec.supernet.training.seed)  # the initial weights
    s = spec.supernet
    if s.kind == "mlp-digits":
        if min(s.widths) < 1:
            raise UserError(f"supernet.widths {s.widths}: every width must be at least 1")
        splits = digits_splits(s.split_seed)
        net = ElasticMLP(s.max_depth, s.widths)
        return Problem(net, splits["train"], splits["validation"], "sklearn load_digits")
    from flows.datasets import open_dataset

    for key in ("depths", "widths", "modes"):
        if min(getattr(s, key)) < 1:
            raise UserError(f"supernet.{key} {getattr(s, key)}: every value must be at least 1")
    dataset = open_dataset(s.dataset, s.dataset_version, storage)
    m = dataset.manifest
    field = next(iter(m.fields))
    grids = [np.asarray(m.grids[a]) for a in m.fields[field].axes]
    # Sub-networks are chosen on a fifth of the training samples, held out from the
    # super-network's training; the data set's test split stays unseen by the search.
    inputs, targets = surrogate_pairs(dataset.arrays("train")[field], grids)
    n = len(inputs)
    if n < 2:
        raise UserError(
            f"dataset {m.name}/{m.version}: {n} training sample; the search holds a fifth of "
            f"them out to validate sub-networks on, and needs at least 2"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.evaluators.seed))
    held = order[: max(1, n // 5)].sort().values
    kept = order[max(1, n // 5) :].sort().values
    net = ElasticFNO([len(g) for g in grids], s.depths, s.widths, s.modes, s.padding)
    return Problem(
        net,
        (inputs[kept], targets[kept]),
        (inputs[held], targets[held]),
        f"{m.name}/{m.version} ({field}; {len(kept)} training, {len(held)} validation samples)",
    )


def check_spec(spec: NASSpec, net) -> None:
    """What pydantic cannot know: the super-network's variables, choices and measures."""
    choices = net.space.choices
    for name, subset in spec.space.items():
        if name not in choices:
            raise UserError(
                f"space.{name}: unknown elastic variable of the {net.kind} super-network "
                f"(variables: {', '.join(choices)})"
            )
        if not subset:
            raise UserError(f"space.{name}: empty choice set (allowed: {list(choices[name])})")
        wrong = sorted(set(subset) - set(choices[name]))
        if wrong:
            raise UserError(
                f"space.{name}: {wrong} not among the super-network's choices {list(choices[name])}"
            )
    for i, objective in enumerate(spec.objectives):
        if objective not in net.measures:
            raise UserError(
                f"objectives.{i}: {objective!r} cannot be measured by the {net.kind} "
                f"super-network (it measures {', '.join(net.measures)})"
            )
    if len(set(spec.objectives)) != len(spec.objectives):
        raise UserError(f"objectives {spec.objectives}: each objective at most once")
    for name in spec.reference_point:
        if name not in spec.objectives:
            raise UserError(f"reference_point.{name}: not one of the objectives")
    space = net.space.restrict(spec.space)
    # (a larger space is not counted, by enumerating it: no budget comes near it)
    if math.prod(len(c) for c in space.choices.values()) <= 1_000_000:
        size = space.size
        if spec.budget > size:
            raise UserError(
                f"budget {spec.budget}: the space holds {size} sub-networks; a budget of "
                f"{size} validates every one"
            )
    if spec.strategy.kind != "random" and spec.budget < spec.strategy.population:
        raise UserError(
            f"budget {spec.budget}: below strategy.population {spec.strategy.population} "
            f"(the initial population of {spec.strategy.kind})"
        )


# Storage: state, super-network, results table -------------------------------------------


class SearchFolder:
    """`<storage>/runs/<name>/nas/`: everything a search writes, each file atomically."""

    def __init__(self, store: Storage):
        self.store = store

    @classmethod
    def of(cls, storage: Storage, name: str) -> SearchFolder:
        return cls(storage.child("runs", name, "nas"))

    def path(self, *parts: str) -> str:
        return self.store.join(*parts)

    def state(self) -> dict[str, Any] | None:
        path = self.path("state.json")
        return self.store.read_json(path) if self.store.exists(path) else None

    def save_state(self, state: dict[str, Any]) -> None:
        self.store.write_json(self.path("state.json"), state)

    def rows(self):
        from actors.nas import Validation

        rows, part = [], 0
        while self.store.exists(self.path("results", f"part-{part:05d}.jsonl")):
            text = self.store.read_bytes(self.path("results", f"part-{part:05d}.jsonl"))
            rows += [Validation.from_json(json.loads(line)) for line in text.splitlines()]
            part += 1
        return rows

    def append(self, rows) -> None:
        """Rewrite the part holding the last row (at most ROWS_PER_PART rows)."""
        part = (len(rows) - 1) // ROWS_PER_PART
        lines = [json.dumps(r.to_json()) for r in rows[part * ROWS_PER_PART :]]
        self.store.write_bytes(
            self.path("results", f"part-{part:05d}.jsonl"), ("\n".join(lines) + "\n").encode()
        )


def save_torch(store: Storage, path: str, obj: Any) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    store.write_bytes(path, buffer.getvalue())


def load_torch(store: Storage, path: str) -> Any:
    import torch

    if not store.exists(path):
        raise UserError(f"{path}: no such file in storage")
    try:
        return torch.load(
            io.BytesIO(store.read_bytes(path)), map_location="cpu", weights_only=False
        )
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as exc:
        raise UserError(f"{path}: not a torch checkpoint ({str(exc).splitlines()[0]})") from None


def _checkpoint_location(ref: str, storage: Storage) -> tuple[Storage, str]:
    if "://" in ref or ref.startswith("/"):
        head, _, tail = ref.rstrip("/").rpartition("/")
        store = Storage.at(head or "/")  # a file at the root: its folder is /, not here
        return store, store.join(tail)
    return storage, storage.join(ref)


# The job ---------------------------------------------------------------------------------


def run_nas(
    spec: NASSpec,
    storage: Storage | None = None,
    resume: bool = False,
    progress=None,
    training_progress=None,
    ray_address: str | None = None,
) -> NASResult:
    from flows.lease import Lease

    storage = storage or Storage.from_env()
    # one job at a time runs a search: a second is refused before it reads anything
    with Lease(storage, ("runs", spec.name, "nas"), f"search {spec.name!r}") as lease:
        return _run_nas(spec, storage, resume, lease.guarding(progress),
                        lease.guarding(training_progress), ray_address)  # fmt: skip


def _run_nas(spec: NASSpec, storage: Storage, resume: bool, progress, training_progress,
             ray_address) -> NASResult:  # fmt: skip
    from flows import tracking
    from flows.runtime import ray_session, reporting_stops, sigterm_requests_stop

    started = time.perf_counter()
    problem = open_problem(spec, storage)
    check_spec(spec, problem.net)
    folder = SearchFolder.of(storage, spec.name)
    state = folder.state()
    digest = spec.model_copy(update={"budget": 0}).digest()
    if state is not None and not resume:
        raise UserError(
            f"search {spec.name!r} already has results in {folder.store.url}; continue it "
            f"with --resume, or choose another name"
        )
    if resume and state is None:
        raise UserError(f"--resume: search {spec.name!r} has no results in {folder.store.url}")
    if state is not None and state["spec_digest"] != digest:
        raise UserError(
            f"--resume: search {spec.name!r} was started from a different spec; only budget "
            f"may change when resuming"
        )
    history = folder.rows()  # read once: the check below, then the search's replay
    if state is not None and spec.budget < (done := len(history)):
        raise UserError(
            f"--resume: budget {spec.budget} is below the {done} validations search "
            f"{spec.name!r} has made already; raise budget to search on"
        )
    use_ray = spec.evaluators.executor == "ray"
    with (
        tracking.job_run(
            EXPERIMENT, spec.name, spec.resolved(), run_id=state and state["run_id"]
        ) as run,
        sigterm_requests_stop(interrupt=True) as terminated,  # as Ctrl-C: validations kept
        ray_session(ray_address, enabled=use_ray),
    ):
        training_progress = reporting_stops(training_progress, terminated)
        progress = reporting_stops(progress, terminated)
        supernet_uri = _supernet(spec, problem, folder, storage, run, training_progress)
        net = problem.net.eval()
        space = net.space.restrict(spec.space)
        validation = _validation_subset(spec, problem)
        if state is None:
            reference = _reference_point(spec, net, space, validation)
            state = {
                "run_id": run.run_id,
                "spec_digest": digest,
                "reference_point": reference,
                "objectives": spec.objectives,
                "supernet": supernet_uri,
            }
            folder.save_state(state)
        run.set_tags(
            {
                "nas.folder": folder.store.url,
                "nas.supernet": supernet_uri,
                "nas.strategy": spec.strategy.kind,
                "nas.space_size": space.size,
                "nas.data": problem.source,
            }
        )
        reference = np.array([state["reference_point"][o] for o in spec.objectives])
        result = _search(spec, net, space, validation, folder, history, run, reference,
                         progress)  # fmt: skip
    result.seconds = time.perf_counter() - started
    return result


def _supernet(spec, problem, folder: SearchFolder, storage: Storage, run, progress) -> str:
    """Load the given or earlier-trained super-network, or train one; returns its URL."""
    from actors.nas import TrainOptions, train_supernet

    if spec.supernet.checkpoint:
        store, path = _checkpoint_location(spec.supernet.checkpoint, storage)
        checkpoint = load_torch(store, path)
        if checkpoint.get("kind") != problem.net.kind or checkpoint.get("arch") != (
            problem.net.arch()
        ):
            raise UserError(
                f"supernet.checkpoint {path}: a {checkpoint.get('kind')} super-network with "
                f"{checkpoint.get('arch')}, the spec describes {problem.net.arch()}"
            )
        problem.net.load_state_dict(checkpoint["state_dict"])
        return path
    path = folder.path("supernet.pt")
    if folder.store.exists(path):
        problem.net.load_state_dict(load_torch(folder.store, path)["state_dict"])
        return path
    t = spec.supernet.training
    options = TrainOptions(t.epochs, t.batch_size, t.lr, t.random_per_step, t.seed)

    def on_epoch(epoch: int, figures: dict[str, float]) -> None:
        run.log_metrics(figures, step=epoch)
        if progress:
            progress(epoch, t.epochs)

    train_supernet(problem.net, problem.train, problem.validation, options, on_epoch)
    save_torch(folder.store, path, problem.net.checkpoint())
    _log_bytes(run.log_file, folder.store.read_bytes(path), "supernet/supernet.pt")
    return path


def _validation_subset(spec: NASSpec, problem: Problem):
    import torch

    inputs, targets = problem.validation
    n = spec.evaluators.validation_samples
    if n is None or n >= len(inputs):
        return inputs, targets
    generator = torch.Generator().manual_seed(spec.evaluators.seed)
    index = torch.randperm(len(inputs), generator=generator)[:n].sort().values
    return inputs[index], targets[index]


def _evaluator_setup(spec: NASSpec, net, validation):
    from actors.nas import EvaluatorSetup, LatencyOptions

    lat = spec.evaluators.latency
    return EvaluatorSetup(
        checkpoint=net.checkpoint(),
        inputs=validation[0],
        targets=validation[1],
        latency=LatencyOptions(lat.batch_size, lat.warmup, lat.repeats, lat.threads),
        measure_latency="latency_ms" in spec.objectives,
    )


def _reference_point(spec: NASSpec, net, space, validation) -> dict[str, float]:
    from actors.nas import SubnetEvaluator

    evaluator = SubnetEvaluator(_evaluator_setup(spec, net, validation))
    extremes = [evaluator.evaluate(space.largest()), evaluator.evaluate(space.smallest())]
    return {
        o: float(spec.reference_point.get(o, 1.1 * max(e[o] for e in extremes)))
        for o in spec.objectives
    }


def _strategy(spec: NASSpec, net, space):
    from actors.nas import COUNTED, Linas, NSGA2Search, RandomSearch

    s = spec.strategy
    if s.kind == "random":
        return RandomSearch(space, spec.objectives, s.seed)
    if s.kind == "nsga2":
        return NSGA2Search(space, spec.objectives, s.seed, s.population)
    return Linas(
        space,
        spec.objectives,
        s.seed,
        s.population,
        s.batch,
        s.inner_generations,
        counted=net.count,
        counted_names=COUNTED,
    )


def _pool(spec: NASSpec, net, validation):
    from actors.nas import EvaluatorPool, InProcessPool, SubnetEvaluator

    setup = _evaluator_setup(spec, net, validation)
    e = spec.evaluators
    if e.executor == "local":
        import torch

        torch.set_num_threads(e.latency.threads)
        return InProcessPool(SubnetEvaluator(setup))
    return EvaluatorPool(
        SubnetEvaluator,
        setup,
        e.actors,
        e.cpus_per_actor,
        e.gpus_per_actor,
        threads=e.latency.threads,
    )


def _search(spec, net, space, validation, folder, history, run, reference,
            progress) -> NASResult:  # fmt: skip
    from actors.nas import front, hypervolume, run_search
    from flows.runtime import ray_is_ending

    objectives = spec.objectives
    strategy = _strategy(spec, net, space)
    quality_logged = 0
    session = uuid.uuid4().hex[:8]
    pool = _pool(spec, net, validation)
    if progress:
        progress(len(history), spec.budget)

    def normalised_hv(rows) -> float:
        ok = [r.objectives(objectives) for r in rows if r.status == "ok"]
        return hypervolume(np.array(ok) / reference, np.ones(len(objectives))) if ok else 0.0

    def on_validation(row, rows) -> None:
        nonlocal quality_logged
        folder.append(rows)
        current = front(rows, objectives)
        metrics = {
            "hypervolume": normalised_hv(current),
            "front_size": len(current),
            "failed": sum(r.status == "failed" for r in rows),
        }
        metrics.update({f"subnet_{k}": v for k, v in row.measures.items()})
        for q in getattr(strategy, "quality", [])[quality_logged:]:
            metrics[f"predictor_mape_{q['objective']}"] = q["mape"]
            metrics[f"predictor_kendall_tau_{q['objective']}"] = q["kendall_tau"]
        quality_logged = len(getattr(strategy, "quality", []))
        finite = {k: v for k, v in metrics.items() if v is not None and np.isfinite(v)}
        run.log_metrics(finite, step=row.index)
        if progress:
            progress(len(rows), spec.budget)

    try:
        outcome = run_search(
            strategy,
            pool,
            space,
            objectives,
            spec.budget,
            history,
            on_validation,
            session=session,
        )
    finally:
        if not ray_is_ending():  # its actors end with this process's lost Ray
            pool.close()
    rows = outcome.rows
    current = front(rows, objectives)
    if not current:
        raise JobFailure(f"search {spec.name!r}: no sub-network validated successfully")
    if outcome.new:  # a resume with nothing left to validate keeps the last figures
        run.log_metrics(
            {
                "validations_new": outcome.new,
                "validations_replayed": outcome.replayed,
                "pool_efficiency": pool.efficiency(),
                "evaluator_restarts": pool.restarts,
            }
        )
    table = _front_table(current, objectives)
    folder.store.write_bytes(folder.path("front.csv"), _csv(table).encode())
    _log_bytes(run.log_file, _csv(table).encode(), "front.csv")
    _log_bytes(run.log_file, _csv([_flat(r) for r in rows]).encode(), "results.csv")
    if hasattr(strategy, "quality"):  # LINAS: its refits' scores (none on too few points)
        run.log_json(strategy.quality, "predictors.json")
    run.log_figure(pareto_figure(rows, current, objectives), "pareto.png")
    return NASResult(
        run_id=run.run_id,
        folder=folder.store.url,
        validated=len(rows),
        new=outcome.new,
        replayed=outcome.replayed,
        failed=sum(r.status == "failed" for r in rows),
        hypervolume=normalised_hv(current),
        front=table,
        objectives=list(objectives),
        seconds=0.0,
        stopped=outcome.stopped,
    )


def _front_table(current, objectives) -> list[dict[str, Any]]:
    """The front as rows numbered from 1 (what `export --pick` refers to)."""
    return [
        {"pick": i + 1, **{o: r.measures[o] for o in objectives}, "config": r.config}
        for i, r in enumerate(current)
    ]


def _flat(row) -> dict[str, Any]:
    return {
        "index": row.index,
        "status": row.status,
        **row.measures,
        "config": row.config,
        "attempts": row.attempts,
        "seconds": row.seconds,
        "actor": row.actor,
        "session": row.session,
        "failure": row.error or "",  # not "error": that is the measured error's column
    }


def _csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()})
    return out.getvalue()


def _log_bytes(log_file, data: bytes, name: str) -> None:
    """Log `data` as artifact `name` through `log_file(path, folder)` (MLflow logs files)."""
    import posixpath
    import tempfile
    from pathlib import Path

    folder, base = posixpath.split(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / base
        path.write_bytes(data)
        log_file(path, folder or None)


def pareto_figure(rows, current, objectives):
    """All validated sub-networks (grey) and the front (highlighted): first objective on x,
    second on y, the third (if any) as colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = np.array([r.objectives(objectives) for r in rows if r.status == "ok"])
    best = np.array([r.objectives(objectives) for r in current])
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    if len(objectives) == 3:
        points = ax.scatter(ok[:, 0], ok[:, 1], c=ok[:, 2], s=12, alpha=0.5, label="validated")
        fig.colorbar(points, ax=ax, label=objectives[2])
    else:
        ax.scatter(ok[:, 0], ok[:, 1], color="0.6", s=12, alpha=0.5, label="validated")
    order = np.argsort(best[:, 0])
    ax.plot(best[order, 0], best[order, 1], "o-", color="tab:red", ms=5, label="Pareto front")
    ax.set_xlabel(objectives[0])
    ax.set_ylabel(objectives[1])
    ax.set_title(f"{len(ok)} validated, {len(best)} on the front")
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


# Export ----------------------------------------------------------------------------------


@dataclass
class ExportResult:
    run_id: str
    pick: int
    config: dict[str, int]
    measures: dict[str, float]
    path: str
    params: int


def export_subnet(
    run_id: str, pick: int, storage: Storage | None = None, out: str | None = None
) -> ExportResult:
    """The `pick`-th sub-network of a search's front (numbered from 1, as printed) as a
    standalone torch module: saved to storage (and `out`), logged to the search's run."""
    import mlflow
    import torch

    from actors.nas import front, load_supernet
    from flows import tracking

    storage = storage or Storage.from_env()
    if out:  # said before any work
        where = Path(out).expanduser()
        if where.is_dir():
            raise UserError(f"--out {out}: a folder; give a file name, e.g. {where / 'pick.pt'}")
        if not where.absolute().parent.is_dir():
            raise UserError(f"--out {out}: folder {where.absolute().parent} does not exist")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    run_id = tracking.full_run_id(run_id)  # its start, as `physflow runs` prints it
    try:
        tags = client.get_run(run_id).data.tags
    except Exception:  # noqa: BLE001 - MLflow raises its own types for a missing run
        raise UserError(
            f"run {run_id!r}: not found in MLflow at {tracking.tracking_uri()}"
        ) from None
    if "nas.folder" not in tags:
        raise UserError(f"run {run_id!r}: not an architecture search run (no nas.folder tag)")
    folder = SearchFolder(Storage.at(tags["nas.folder"]))
    state = folder.state()
    if state is None:
        raise UserError(f"run {run_id!r}: its results at {folder.store.url} are gone")
    current = front(folder.rows(), state["objectives"])
    if not 1 <= pick <= len(current):
        raise UserError(f"--pick {pick}: the front of run {run_id} has {len(current)} entries")
    row = current[pick - 1]
    supernet_store, path = _checkpoint_location(state["supernet"], storage)
    module = load_supernet(load_torch(supernet_store, path)).extract(row.config).eval()
    target = folder.path("export", f"pick-{pick}.pt")
    save_torch(folder.store, target, module)
    if out:
        torch.save(module, out)
    _log_bytes(
        lambda path, where: client.log_artifact(run_id, str(path), where),
        folder.store.read_bytes(target),
        f"export/pick-{pick}.pt",
    )
    return ExportResult(
        run_id=run_id,
        pick=pick,
        config=row.config,
        measures=row.measures,
        path=out or target,
        params=sum(p.numel() for p in module.parameters()),
    )
