"""MLflow, embedded or remote.

Without `MLFLOW_TRACKING_URI` runs go to a SQLite database under `.physflow/` with
artifacts beside it, so `make ui` can browse them; with it, to that MLflow server (whose
artifacts may be proxied to S3). Jobs call `job_run`, log through the returned run, and
`physflow runs` reads them back with `list_runs`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows.errors import UserError
from flows.storage import physflow_home

# MLflow's own limit on one param value.
_MAX_PARAM_CHARS = 6000


# The stores MLflow's client takes (a plain folder would be its retired file store)
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
        if scheme not in TRACKING_SCHEMES:
            raise UserError(
                f"MLFLOW_TRACKING_URI={uri}: not a tracking store (use http(s)://host:port, "
                f"sqlite:///path.db or postgresql://…; unset, physflow uses its own)"
            )
        return uri
    home = physflow_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = "a file, not a folder" if isinstance(exc, FileExistsError) else exc.strerror
        raise UserError(f"PHYSFLOW_HOME={home}: cannot be a folder here ({why})") from None
    return f"sqlite:///{home / 'mlflow.db'}"


def _embedded_artifact_root(experiment: str) -> str | None:
    """For a SQLite store, artifacts beside the database; a server decides its own."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.parent / "mlartifacts" / experiment).as_uri()


_OPENED: set[str] = set()  # SQLite stores this process has opened: their tables exist


def _client():
    import mlflow

    uri = tracking_uri()
    # Note: MLflow also exports this URI as MLFLOW_TRACKING_URI, for child processes.
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///") or uri in _OPENED:
        return mlflow.MlflowClient()
    # A new SQLite store creates its tables as it opens: two jobs started together on a
    # fresh folder would both create them, and one fail. One opens it at a time.
    import fcntl

    database = Path(uri.removeprefix("sqlite:///"))
    try:
        database.parent.mkdir(parents=True, exist_ok=True)  # as MLflow would
        lock = open(f"{database}.lock", "a")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise UserError(f"MLflow store {uri}: cannot be created ({exc.strerror})") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = mlflow.MlflowClient()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _OPENED.add(uri)
    return client


def _check_server(timeout_s: float = 5.0) -> None:
    """Fail at once, with one line, when an MLflow server is not even listening: MLflow's
    own client retries a refused connection with back-off for about four minutes first."""
    from urllib.parse import urlsplit

    uri = tracking_uri()
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"MLflow at {uri}: cannot connect ({reason}; is the server up?)") from None


def connect() -> None:
    """Point MLflow's fluent API at the tracking store, failing with one line when a server
    is not listening; creates nothing (reading an artifact needs no experiment)."""
    _check_server()
    _client()


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created (with embedded artifact root) if needed."""
    _check_server()
    client = _client()
    try:
        found = client.get_experiment_by_name(name)
    except Exception as exc:  # noqa: BLE001 - any transport error means the same to a user
        raise UserError(f"MLflow at {tracking_uri()}: cannot connect ({_brief(exc)})") from None
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    return client.create_experiment(name, artifact_location=_embedded_artifact_root(name))


@dataclass
class JobRun:
    """An open MLflow run with the few logging calls jobs need."""

    run_id: str
    experiment: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        clean = {k: _param_text(v) for k, v in params.items()}
        keys = sorted(clean)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params({k: clean[k] for k in keys[i : i + 100]})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_json(self, obj: Any, name: str) -> None:
        import mlflow

        mlflow.log_text(json.dumps(obj, indent=2), name)

    def log_yaml(self, obj: Any, name: str) -> None:
        import mlflow

        mlflow.log_text(yaml.safe_dump(obj, sort_keys=False), name)

    def log_figure(self, figure, name: str) -> None:
        import mlflow

        mlflow.log_figure(figure, name)

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=folder)


@contextlib.contextmanager
def job_run(
    experiment: str, run_name: str, spec: Mapping[str, Any], run_id: str | None = None
) -> Iterator[JobRun]:
    """Open a run in `experiment` (or reopen `run_id` to continue it), log the resolved spec
    (params + spec.yaml), close it.

    The run ends FAILED if the job raises, KILLED on Ctrl-C, FINISHED otherwise. A reopened
    run keeps its params (MLflow cannot change them); the spec it continued with is logged
    as an artifact.
    """
    import mlflow

    experiment_id = ensure_experiment(experiment)
    if run_id is not None:
        active_run = mlflow.start_run(run_id=run_id)
    else:
        active_run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
    with active_run as active:
        run = JobRun(run_id=active.info.run_id, experiment=experiment)
        submission = os.environ.get("PHYSFLOW_SUBMISSION_ID")
        if submission:  # set by `physflow submit`: the cluster job this run belongs to
            run.set_tags({"physflow.submission_id": submission})
        if run_id is None:
            run.set_tags({"physflow.job": experiment})
            run.log_params(flatten(spec))
            run.log_yaml(dict(spec), "spec.yaml")
        else:
            run.log_yaml(dict(spec), "spec-resumed.yaml")
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            raise


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class RunRow:
    run_id: str
    name: str
    status: str
    start: float | None  # seconds since the epoch
    duration_s: float | None
    metrics: dict[str, float]
    experiment: str = ""
    job: str = ""  # the physflow job that made it (tag physflow.job), where it says


def list_runs(experiment: str | None, max_results: int = 20) -> list[RunRow]:
    """The latest runs of `experiment` (of every experiment: None), newest first."""
    _check_server()
    client = _client()
    try:
        experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"MLflow at {tracking_uri()}: cannot connect ({_brief(exc)})") from None
    if experiment is not None:
        found = [i for i, name in experiments.items() if name == experiment]
        if not found:
            raise UserError(
                f"experiment {experiment!r} not found in {tracking_uri()} "
                f"(known: {', '.join(sorted(experiments.values())) or 'none'})"
            )
        experiments = {found[0]: experiment}
    if not experiments:
        return []
    runs = client.search_runs(
        list(experiments), order_by=["attributes.start_time DESC"], max_results=max_results
    )
    rows = []
    now_ms = time.time() * 1000
    for r in runs:
        start, end = r.info.start_time, r.info.end_time
        duration = ((end or now_ms) - start) / 1000 if start else None
        rows.append(
            RunRow(
                run_id=r.info.run_id,
                name=r.info.run_name or r.info.run_id[:8],
                status=r.info.status,
                start=start / 1000 if start else None,
                duration_s=duration,
                metrics=dict(r.data.metrics),
                experiment=experiments.get(r.info.experiment_id, r.info.experiment_id),
                job=r.data.tags.get("physflow.job", ""),
            )
        )
    return rows


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def _brief(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def registered_uri(name: str, model_uri: str | None) -> str | None:
    """The registry's URI (models:/NAME/VERSION) of the version of `name` made from the
    logged model `model_uri` (models:/m-...); None if there is none."""
    if model_uri is None:
        return None
    versions = _client().search_model_versions(f"name = '{name}'")
    found = [int(v.version) for v in versions if v.source == model_uri]
    return f"models:/{name}/{max(found)}" if found else None


def full_run_id(text: str) -> str:
    """The start of a run id, as `physflow runs` prints it (8 to 31 hex digits) -> the
    whole id of the one run it starts; anything else is returned as it is. A start that
    no run's id has, or several runs' ids have, is a user error."""
    from mlflow.entities import ViewType

    if not re.fullmatch(r"[0-9a-f]{8,31}", text):
        return text
    client = _client()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(
        experiments, f"attributes.run_id LIKE '{text}%'", ViewType.ALL, max_results=2
    )
    if not runs:
        raise UserError(f"run {text!r}: no run's id starts so (`physflow runs` lists them)")
    if len(runs) > 1:
        raise UserError(f"run {text!r}: the ids of several runs start so; give more of it")
    return runs[0].info.run_id
