"""`physflow evaluate`: score a logged model on any compatible data set's test split."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import numpy as np

from flows.datasets import open_dataset
from flows.errors import UserError
from flows.storage import Storage

EXPERIMENT = "evaluate"


@dataclass
class Evaluation:
    model_uri: str
    dataset: str
    samples: int
    rel_l2_mean: float
    rel_l2_std: float
    run_id: str


def model_uri(ref: str) -> str:
    """A run id (or its start, as `physflow runs` prints it), `runs:/<id>/model` or
    `models:/<name>/<version|alias>` -> a model URI."""
    from flows.tracking import full_run_id

    ref = full_run_id(ref)
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return f"runs:/{ref}/model"
    name = re.fullmatch(r"models:/([^/]+)", ref)
    if name and not re.fullmatch(r"m-[0-9a-f]{32}", name[1]):  # not a logged model's id
        raise UserError(
            f"model {ref!r}: name a version or an alias of the registered model: "
            f"models:/{name[1]}/<version> (`physflow runs` lists the runs that made them)"
        )
    if ref.startswith(("runs:/", "models:/")):
        return ref
    raise UserError(
        f"model {ref!r}: expected a run id (32 hex digits), runs:/<id>/model or "
        f"models:/<name>/<version>"
    )


def load_model(uri: str):
    import mlflow

    import actors.surrogate  # noqa: F401 - this physflow's code, not the copy a model carries
    from flows.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    path = list(sys.path)
    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for "not there"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        run = _run_without_model(uri)
        if run is not None:
            raise UserError(f"model {uri}: {run} has no logged model there") from None
        raise UserError(f"model {uri}: cannot be loaded ({first[:200]})") from None
    finally:
        sys.path[:] = path  # MLflow puts the model's code first on it, for good


def _run_without_model(uri: str) -> str | None:
    """'run <id> (experiment <name>)' when `uri` is runs:/<id>/... of a run that exists,
    else None."""
    import mlflow

    found = re.fullmatch(r"runs:/([0-9a-f]{32})/.*", uri)
    if not found:
        return None
    try:
        client = mlflow.MlflowClient()
        run = client.get_run(found[1])
        experiment = client.get_experiment(run.info.experiment_id).name
    except Exception:  # noqa: BLE001 - no such run: the caller's message stands
        return None
    return f"run {found[1]} (experiment {experiment})"


def _on_grids_of(model, uri: str, m, field: str):
    """`model` on the data set's grids, refused unless they cover its domain: the same axes,
    the same end time, each space axis as long (within a cell: cell centres move with the
    resolution). Another resolution is fine where the network resolves the same Fourier
    modes on it (`PDESurrogate.on_grids`); the model's own grids leave it as it is."""
    import torch

    axes = list(m.fields[field].axes)
    where = f"dataset {m.name}/{m.version}"
    if axes != model.axes:
        raise UserError(f"{where}: axes {axes}, model {uri} has {model.axes}")
    grids = {a: torch.tensor(m.grids[a], dtype=torch.float64) for a in axes}
    for axis in axes:
        mine, theirs = model.grids[axis], grids[axis]
        ends = (float(mine[0]), float(mine[-1])), (float(theirs[0]), float(theirs[-1]))
        spacing = float(mine[1] - mine[0]) if len(mine) > 1 else 1.0
        if axis == "t" and abs(ends[0][1] - ends[1][1]) > 1e-9 * max(1.0, abs(ends[0][1])):
            raise UserError(
                f"{where}: t ends at {ends[1][1]:g}, model {uri} was trained to {ends[0][1]:g}"
            )
        # cell centres move with the resolution; the domain's ends stay within a cell
        if axis != "t" and abs((ends[0][1] - ends[0][0]) - (ends[1][1] - ends[1][0])) > spacing:
            raise UserError(
                f"{where}: {axis} spans {ends[1]}, model {uri} was trained on {ends[0]}"
            )
    if tuple(len(g) for g in grids.values()) == tuple(model.partition.grid_shape):
        return model
    try:
        return model.on_grids(grids)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def evaluate_model(
    ref: str,
    dataset: str,
    version: str | None = None,
    storage: Storage | None = None,
    batch_size: int = 4,
    limit: int | None = None,
    progress=None,
) -> Evaluation:
    from flows import tracking
    from flows.runtime import sigterm_requests_stop
    from flows.train import evaluate

    uri = model_uri(ref)
    model = load_model(uri)
    data = open_dataset(dataset, version, storage or Storage.from_env())
    m = data.manifest
    field = model.constraint.field
    if m.pde["name"] != model.pde or field not in m.fields:
        raise UserError(
            f"dataset {m.name}/{m.version} is {m.pde['name']!r}; model {uri} solves {model.pde!r}"
        )
    model = _on_grids_of(model, uri, m, field)
    with sigterm_requests_stop(interrupt=True):  # as Ctrl-C: nothing scored is logged
        errors, _ = evaluate(model, data, field, batch_size, limit, progress)
    errors = errors[:limit] if limit else errors
    spec = {"model": uri, "dataset": f"{m.name}/{m.version}", "limit": limit}
    label = re.sub(r"^runs:/([0-9a-f]{8})[0-9a-f]{24}/model$", r"\1", uri)  # a run: its id
    with tracking.job_run(EXPERIMENT, f"{label} on {m.name}/{m.version}", spec) as run:
        run.log_metrics(
            {
                "test_rel_l2_mean": float(np.mean(errors)),
                "test_rel_l2_std": float(np.std(errors)),
                "samples": len(errors),
            }
        )
    return Evaluation(
        uri,
        f"{m.name}/{m.version}",
        len(errors),
        float(np.mean(errors)),
        float(np.std(errors)),
        run.run_id,
    )
