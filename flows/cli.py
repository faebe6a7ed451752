"""The `physflow` command: parses, prints, maps errors to exit codes. No science here.

Exit codes: 0 success, 1 a failure while doing the work, 2 a user mistake (bad spec,
missing data set, bad URL), always with one line saying what and where.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.cli_group import (
    OneLineUsage,
    Progress,
    RayAddressOption,
    SetOption,
    SpecPath,
    StorageOption,
    continue_with,
    model_line,
    sets,
    stop_code,
    stopped,
)
from flows.errors import PhysflowError

app = typer.Typer(
    cls=OneLineUsage,
    name="physflow",
    help="Scientific-ML workflows: PDE data sets, hard-constrained experts, PBT and NAS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
datasets_app = typer.Typer(help="Published data sets.", no_args_is_help=False)
app.add_typer(datasets_app, name="datasets")


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 200  # pipes and logs: do not squeeze tables into 80 columns
    return console


out = _console()
err = _console(stderr=True)

# The metrics `physflow runs` shows first for an experiment; others fill up to five.
KEY_METRICS = {
    "preprocess": ["samples", "samples_per_s", "bytes", "shards_resumed"],
    "train": ["test_rel_l2_mean", "loss", "lm_iterations", "converged_share", "step_seconds"],
    "evaluate": ["test_rel_l2_mean", "test_rel_l2_std", "samples"],
    "pbt": ["score", "best_score", "final_score", "exploits", "overhead_fraction"],
    "nas": ["hypervolume", "front_size", "failed", "validations_new", "pool_efficiency"],
}


def reports_errors(command):
    """Print a PhysflowError as one line and exit with its code; no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PhysflowError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"physflow {version('physflow')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="show version")
    ] = False,
) -> None:
    import logging
    import os

    # Library chatter (database migrations, connection retries) is not for the terminal.
    # MLflow sets its own level when imported, from this variable.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("mlflow", "alembic", "botocore", "s3fs", "distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


@app.command()
@reports_errors
def preprocess(
    spec: SpecPath,
    set_: SetOption = None,
    storage: StorageOption = None,
    dask_address: Annotated[
        str | None,
        typer.Option(help="Dask scheduler [env: PHYSFLOW_DASK_ADDRESS; default: local cluster]"),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, max=256, help="local Dask workers [default: cores]")
    ] = None,
) -> None:
    """Simulate or ingest PDE trajectories into a published data set (Parquet + manifest)."""
    from flows.preprocess import PreprocessSpec
    from flows.preprocess import preprocess as run_job
    from flows.spec import load_spec
    from flows.storage import Storage

    job = load_spec(PreprocessSpec, spec, set_ or [])
    root = Storage.from_env(storage).check()
    try:
        with Progress(f"{job.name} {job.version}", "shards") as update:
            result, run_id = run_job(job, root, dask_address, workers, update)
    except KeyboardInterrupt as stop:
        typer.echo(
            f"{stopped(stop)}: {job.name} {job.version} was not published; finished shards "
            f"are kept, and the same command resumes from them",
            err=True,
        )
        raise typer.Exit(stop_code(stop)) from None
    m = result.manifest
    if result.already_published:
        out.print(f"{m.name} {m.version} is already published at {result.folder} (unchanged)")
    else:
        rate = result.samples / max(result.seconds, 1e-9)
        resumed = f", {result.shards_resumed} resumed" if result.shards_resumed else ""
        out.print(
            f"published {m.name} {m.version}: {result.samples} samples "
            f"({', '.join(f'{k} {v.rows}' for k, v in m.splits.items())}), "
            f"{_bytes(result.bytes)} in {result.seconds:.1f} s ({rate:.2f} samples/s"
            f"{resumed})"
        )
        out.print(f"  at   {result.folder}")
    if m.skipped:
        out.print(f"  skipped {len(m.skipped)} bad samples (see the manifest's 'skipped')")
    if run_id is not None:
        out.print(f"  run  {run_id} (experiment preprocess)")


@app.command()
@reports_errors
def train(
    spec: SpecPath,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's last checkpoint")] = False,
    storage: StorageOption = None,
    ray_address: RayAddressOption = None,
) -> None:
    """Train a hard-constrained PDE model (PI-HC-MoE, PI-HC or PI-SC) on a data set."""
    from flows.spec import load_spec
    from flows.storage import Storage
    from flows.train import Checkpoints, TrainSpec
    from flows.train import train as run_job

    job = load_spec(TrainSpec, spec, set_ or [])
    root = Storage.from_env(storage).check()
    try:
        with Progress(job.name, "steps", field="loss") as update:
            result = run_job(job, root, resume, update, ray_address)
    except KeyboardInterrupt as stop:
        latest = Checkpoints(root, job.name).latest()
        again = _as_typed("train", spec, set_, storage, ray_address)
        if latest is None:
            told = (
                f" before the first step: nothing saved; start again with: {continue_with(again)}"
            )
        else:
            told = (
                f": checkpoint at step {latest['step']} saved; continue with: "
                f"{continue_with(again, ['--resume'])}"
            )
        typer.echo(stopped(stop) + told, err=True)
        raise typer.Exit(stop_code(stop)) from None
    _print_train(result)


def _as_typed(command: str, spec, set_, storage, ray_address) -> list[str]:
    """`physflow <command> SPEC` with the options that decide what it continues."""
    typed = ["physflow", command, str(spec), *sets(set_)]
    for flag, value in (("--storage", storage), ("--ray-address", ray_address)):
        typed += [flag, value] if value else []
    return typed


def _print_train(result) -> None:
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    if result.resumed_from == result.steps:  # `physflow run` again on a finished run
        out.print(
            f"already trained {result.steps} steps: scored again in {result.seconds:.1f} s, "
            f"the model unchanged"
        )
    else:
        out.print(f"trained {result.steps} steps{resumed} in {result.seconds:.1f} s")
    out.print(f"  test relative L2  {result.rel_l2_mean:.2%} ± {result.rel_l2_std:.2%}")
    if result.step_seconds is not None:
        share = "" if result.expert_share is None else f", {result.expert_share:.0%} in the experts"
        out.print(f"  per step  {result.step_seconds:.3f} s (median){share}")
    out.print(f"  run    {result.run_id} (experiment train)")
    if result.registered:
        out.print(f"  model  {model_line(result.registered, result.model_uri)}")


@app.command()
@reports_errors
def evaluate(
    model: Annotated[str, typer.Argument(help="run id, runs:/<id>/model or models:/<name>/<v>")],
    dataset: Annotated[str, typer.Option(help="data set name or version-folder URL")],
    version: Annotated[str | None, typer.Option(help="data set version [default: latest]")] = (
        None
    ),
    limit: Annotated[int | None, typer.Option(min=1, help="score at most this many")] = None,
    storage: StorageOption = None,
) -> None:
    """Score a logged model on a data set's test split (relative L2)."""
    from flows.evaluate import evaluate_model
    from flows.storage import Storage

    root = Storage.from_env(storage).check()
    try:
        with Progress(f"evaluate {model}", "samples") as update:
            result = evaluate_model(model, dataset, version, root, limit=limit, progress=update)
    except KeyboardInterrupt as stop:
        typer.echo(f"{stopped(stop)}: nothing was logged; the same command scores it again",
                   err=True)  # fmt: skip
        raise typer.Exit(stop_code(stop)) from None
    out.print(
        f"{result.model_uri} on {result.dataset}: relative L2 {result.rel_l2_mean:.2%} "
        f"± {result.rel_l2_std:.2%} over {result.samples} test samples"
    )
    out.print(f"  run  {result.run_id} (experiment evaluate)")


@app.command("run")
@reports_errors
def run_quickstart(
    spec: SpecPath,
    set_: SetOption = None,
    storage: StorageOption = None,
    workers: Annotated[int | None, typer.Option(min=1, max=256, help="local Dask workers")] = (
        None
    ),
    ray_address: RayAddressOption = None,
) -> None:
    """Preprocess, train, evaluate and register in one go (the quickstart)."""
    from flows import tracking
    from flows.quickstart import RunSpec, run
    from flows.spec import load_spec
    from flows.storage import Storage

    job = load_spec(RunSpec, spec, set_ or [])
    root = Storage.from_env(storage).check()
    try:
        with (
            Progress(f"data {job.preprocess.name}", "shards") as pre,
            Progress(f"train {job.train.name}", "steps", field="loss") as steps,
        ):
            data, result = run(job, root, pre, steps, None, workers, ray_address)
    except KeyboardInterrupt as stop:
        again = continue_with(_as_typed("run", spec, set_, storage, ray_address))
        typer.echo(f"{stopped(stop)}: {again} continues from the last checkpoint", err=True)
        raise typer.Exit(stop_code(stop)) from None
    m = data.manifest
    out.print(f"data   {m.name} {m.version}: {m.rows} samples at {data.folder}")
    _print_train(result)
    out.print(f"browse  {browse_hint(tracking.tracking_uri())}")


def browse_hint(uri: str) -> str:
    """Where to look at the runs: `make ui` serves the project's own embedded store only."""
    if not uri.startswith("sqlite:///"):
        return f"{uri}  (MLflow; or physflow runs)"
    if uri == f"sqlite:///{Path('.physflow/mlflow.db').absolute()}":
        return "make ui  (MLflow at http://127.0.0.1:5000; or physflow runs)"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1  (or physflow runs)"


@datasets_app.callback(invoke_without_command=True)
@reports_errors
def datasets_list(ctx: typer.Context, storage: StorageOption = None) -> None:
    """List published data sets: name, version, PDE, samples, size, created."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = storage
        return
    from flows.datasets import list_datasets
    from flows.storage import Storage

    root = Storage.from_env(storage).check()
    unreadable: list[str] = []
    manifests = list_datasets(root, unreadable)
    for problem in unreadable:
        err.print(f"skipped: {problem}", soft_wrap=True)
    if not manifests:
        out.print(f"no data sets published in {root.url}")
        return
    table = Table(
        "name",
        "version",
        "pde",
        "train",
        "test",
        "size",
        "created",
        title=f"data sets in {root.url}",
        title_justify="left",
    )
    for m in manifests:
        table.add_row(
            m.name,
            m.version,
            m.pde["name"],
            str(_rows(m, "train")),
            str(_rows(m, "test")),
            _bytes(m.bytes),
            m.created,
        )
    out.print(table)


@datasets_app.command("show")
@reports_errors
def datasets_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="data set name, or URL of a version folder")],
    version: Annotated[str | None, typer.Option(help="version [default: latest]")] = None,
    verify: Annotated[bool, typer.Option(help="check every shard's checksum")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest as JSON")] = False,
    storage: StorageOption = None,
) -> None:
    """Show one data set's manifest: grids, parameters, statistics, shards."""
    from flows.datasets import open_dataset
    from flows.storage import Storage

    root = Storage.from_env(storage or ctx.obj).check()
    dataset = open_dataset(name, version, root)
    m = dataset.manifest
    if verify:
        n = dataset.verify()
    if as_json:
        out.print_json(json.dumps(m.to_json()))
        return
    out.print(f"[bold]{m.name}[/bold] {m.version}  ({dataset.folder.url})")
    out.print(f"  created   {m.created}")
    out.print(f"  pde       {m.pde['name']}  " + _params(m.pde.get("parameters", {})))
    out.print(
        f"  source    {m.source.get('kind')}"
        + (f"  {m.source['path']} ({m.source.get('layout')})" if "path" in m.source else "")
    )
    for axis, grid in m.grids.items():
        out.print(f"  grid {axis:<4} {len(grid)} points on [{grid[0]:.6g}, {grid[-1]:.6g}]")
    for fname, f in m.fields.items():
        out.print(f"  field     {fname} {tuple(f.shape)} ({', '.join(f.axes)}) {f.dtype}")
    table = Table("split", "field", "rows", "shards", "size", "mean", "std", "min", "max")
    for split, s in m.splits.items():
        for fname, st in s.statistics.items():
            table.add_row(
                split,
                fname,
                str(s.rows),
                str(len(s.shards)),
                _bytes(sum(sh.bytes for sh in s.shards)),
                *(f"{st[k]:.4g}" for k in ("mean", "std", "min", "max")),
            )
    out.print(table)
    if m.skipped:
        out.print(f"  skipped   {len(m.skipped)} bad samples, e.g. {m.skipped[0]['reason']}")
    if verify:
        out.print(f"  verified  {n} shards: every checksum matches")


@app.command()
@reports_errors
def runs(
    experiment: Annotated[
        str | None,
        typer.Option(
            "--experiment", "-e", help="MLflow experiment: train, evaluate, preprocess, nas, ..."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="most recent runs to show")] = 20,
) -> None:
    """List the latest runs (of one experiment with -e: with its key metrics)."""
    from flows import tracking

    rows = tracking.list_runs(experiment, limit)
    if not rows:
        out.print(f"no runs in experiment {experiment!r}" if experiment else "no runs yet")
        return
    if experiment is None:
        _print_all_runs(rows, tracking.tracking_uri())
        return
    keys = _metric_columns(rows, _key_metrics(experiment, {r.job for r in rows}))
    table = Table(
        "run",
        "name",
        "status",
        "start",
        "duration",
        *keys,
        title=f"{experiment} — {tracking.tracking_uri()}",
        title_justify="left",
    )
    for r in rows:
        start = datetime.fromtimestamp(r.start).strftime("%Y-%m-%d %H:%M:%S") if r.start else "-"
        table.add_row(
            r.run_id[:8],
            r.name,
            r.status,
            start,
            f"{r.duration_s:.1f} s" if r.duration_s is not None else "-",
            *(f"{r.metrics[k]:.4g}" if k in r.metrics else "-" for k in keys),
        )
    out.print(table)


def _key_metrics(experiment: str, jobs: set[str] = frozenset()) -> list[str]:
    """The key metrics of an experiment's job: known by its runs' physflow.job tag, else
    by its name (a PBT search's experiment is named after the search)."""
    by_tag = next((KEY_METRICS[j] for j in sorted(jobs) if j in KEY_METRICS), None)
    return by_tag or KEY_METRICS.get(experiment) or KEY_METRICS.get(experiment.split("-")[0], [])


def _print_all_runs(rows, uri: str) -> None:
    """Every experiment's latest runs, each with its experiment's first key metric."""
    table = Table(
        "run", "experiment", "name", "status", "start", "duration", "key metric",
        title=f"latest runs — {uri} (one experiment's, with its metrics: -e NAME)",
        title_justify="left",
    )  # fmt: skip
    for r in rows:
        start = datetime.fromtimestamp(r.start).strftime("%Y-%m-%d %H:%M:%S") if r.start else "-"
        key = next((k for k in _key_metrics(r.experiment, {r.job}) if k in r.metrics), None)
        table.add_row(
            r.run_id[:8], r.experiment, r.name, r.status, start,
            f"{r.duration_s:.1f} s" if r.duration_s is not None else "-",
            f"{key} {r.metrics[key]:.4g}" if key else "-",
        )  # fmt: skip
    out.print(table)


def _metric_columns(rows, first: list[str], most: int = 5) -> list[str]:
    """The experiment's key metrics that runs have, then those most runs have."""
    counts: dict[str, int] = {}
    for r in rows:
        for k in r.metrics:
            counts[k] = counts.get(k, 0) + 1
    keys = [k for k in first if k in counts]
    keys += sorted((k for k in counts if k not in keys), key=lambda k: (-counts[k], k))
    return keys[:most]


def _rows(m, split: str) -> int:
    return m.splits[split].rows if split in m.splits else 0


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _params(params: dict) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


# Commands that live in their own modules: each exposes register(app, reports_errors, out, err).
for _module in ("flows.pbt_cli", "flows.nas_cli", "flows.submit_cli"):
    __import__(_module, fromlist=["register"]).register(app, reports_errors, out, err)


def main() -> None:
    try:
        app(prog_name="physflow")
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit as end:
        # This process ended its own Ray: Ray's core worker would crash the interpreter's
        # exit. (Runtime not imported: no Ray was started.)
        runtime = sys.modules.get("flows.runtime")
        if runtime is not None and runtime.local_ray_ended():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(end.code if isinstance(end.code, int) else 1)
        raise


if __name__ == "__main__":
    main()
