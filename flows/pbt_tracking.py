"""The MLflow side of `physflow pbt`: what a search leaves in the tracking server.

    parent run + one nested run per member; hyperparameters as metrics `hp.<name>`
    an exploit = a tag on the member's run + a row of the parent's exploits.json
    lineage.json (what replay needs) + lineage.png; the winner's model registered

`Tracker` is the population's listener; `flows.pbt.run_pbt` drives it.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.pbt import PbtSpec  # flows.pbt imports this module


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

    def stopped(self) -> None:
        """The search was interrupted: what was buffered is written, and the runs of the
        members still running end KILLED (a `--resume` reopens them)."""
        self.flush()
        for run_id in self.runs.values():
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status="KILLED")

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


def lineage_document(spec: PbtSpec, lineage, runs: dict[int, str]) -> dict[str, Any]:
    """lineage.json: the lineage plus what replay needs (the spec, the member seeds)."""
    data = lineage.to_json()
    for record in data["members"]:
        record["run_id"] = runs.get(record["member"])
    data["name"] = spec.name
    data["spec"] = spec.resolved()
    return data


def log_artifacts(run, spec: PbtSpec, lineage, data: dict[str, Any]) -> None:
    from actors.pbt.lineage import draw

    run.log_json(data, "lineage.json")
    run.log_json(lineage.exploits, "exploits.json")
    figure = draw(lineage, title=f"{spec.name}: {spec.strategy}, {spec.metric} ({spec.mode})")
    run.log_figure(figure, "lineage.png")
    import matplotlib.pyplot as plt

    plt.close(figure)


def register_winner(
    spec: PbtSpec, storage, population, tracker, winner
) -> tuple[str | None, str | None]:
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
