"""`physflow pbt replay`: one member's whole schedule trained again from a search's
lineage (its root ancestor's seed, then each segment's steps with its hyperparameters),
in this process, to check that the recorded score is reproduced.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flows.errors import UserError
from flows.pbt import PbtSpec, pde_experts, resolve_trainable
from flows.storage import Storage


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

        try:
            with open(source) as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{source}: not a lineage.json (not JSON: {exc})") from None
        if not isinstance(data, dict) or not {"spec", "members"} <= data.keys():
            raise UserError(
                f"{source}: not a lineage.json (a search's has 'spec' and 'members'; "
                f"find it among the parent run's artifacts)"
            )
        return data
    from flows import tracking

    tracking.connect()
    import mlflow

    source = tracking.full_run_id(source)  # its start, as `physflow runs` prints it

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
    # A member ran in a Ray actor, whose torch uses as many threads as the actor's whole
    # CPUs (at least one): the same count here, or reductions sum in another order and
    # the replay drifts from the record.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(spec.resources.member_cpus or 1)))
    try:
        with ray_session(ray_address, enabled=pde_experts(spec) > 0):
            final = _train_schedule(builder(seed, options), segments, total, progress)
    finally:
        torch.set_num_threads(threads)
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


def _train_schedule(trainer, segments, total: int, progress) -> dict[str, float]:
    """Each segment's steps with its hyperparameters, then the trainer's evaluation;
    the trainer is closed whatever happens."""
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
        return final
    finally:
        close = getattr(trainer, "close", None)
        if close is not None:
            close()
