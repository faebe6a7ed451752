"""The population controller: one driver loop over long-lived member actors.

    synchronous:  all live members train to the next ready step -> rank -> exploit/explore
                  -> commit the search state -> repeat
    asynchronous: each member, as soon as it reaches its ready step, is ranked against the
                  others' latest scores, exploits/explores, and goes on

Exploit copies weights and hyperparameters: synchronously from the donor's memory through
the object store; asynchronously (the donor is busy) from the donor's latest checkpoint,
which the ledger keeps until the recipient has one of its own. Strategies besides PBT use
the same loop: `random` and `grid` (fixed hyperparameters), `explore_only`,
`exploit_only` — so comparisons spend the same budget in the same way.

Faults: a member whose actor dies (or sends nothing within `member_timeout_s`) is
restarted from its last checkpoint, up to `max_member_restarts` times, and its call
repeated; a member whose trainer raises, or that dies too often, is marked failed and left
out — the synchronous barrier waits only for live members, so it never hangs on a dead one.
After every round the search state (lineage, hyperparameters, latest checkpoints, the
random generator) is written to `<folder>/state.json`; `resume` continues from it.
"""

from __future__ import annotations

import logging
import math
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from actors.pbt import policy
from actors.pbt.ledger import CheckpointLedger
from actors.pbt.lineage import Lineage, MemberRecord, Segment
from actors.pbt.member import Member
from actors.pbt.space import SearchSpace, Value
from actors.pbt.trainable import Builder

log = logging.getLogger(__name__)

Strategy = Literal["pbt", "random", "grid", "explore_only", "exploit_only"]


class MetricMissing(ValueError):
    """The trainable's report lacks the metric the search ranks by."""


class PopulationFailed(RuntimeError):
    """Every member failed."""


@dataclass(frozen=True)
class PopulationConfig:
    size: int
    steps: int
    ready_steps: int
    metric: str
    mode: policy.Mode = "max"
    strategy: Strategy = "pbt"
    exploit: Literal["truncation", "tournament"] = "truncation"
    quantile: float = 0.2
    resample_probability: float = 0.25
    synchronous: bool = True
    seed: int = 0
    max_member_restarts: int = 2
    member_timeout_s: float | None = None
    member_cpus: float = 1.0
    member_gpus: float = 0.0
    commit_every_s: float = 2.0  # a killed driver redoes at most this much work


class Listener:
    """What the controller tells the job; each method may be overridden."""

    def on_segment(self, member: int, segment: Segment, report: dict[str, Any]) -> None: ...

    def on_exploit(self, record: dict[str, Any]) -> None: ...

    def on_failure(self, member: int, reason: str) -> None: ...

    def on_progress(self, done: int, total: int, best: float | None) -> None: ...

    def on_restart(self, member: int, reason: str) -> None: ...

    def flush(self) -> None:
        """Write what was buffered; called just before the search state is committed."""

    def extra_state(self) -> dict[str, Any]:
        return {}


@dataclass
class Timing:
    wall_seconds: float = 0.0
    step_seconds: dict[int, float] = field(default_factory=dict)
    eval_seconds: float = 0.0
    save_seconds: float = 0.0
    steps_trained: int = 0  # by this process's run (a resumed run counts only its own)


class Population:
    def __init__(
        self,
        config: PopulationConfig,
        space: SearchSpace,
        builder: Builder,
        options: dict[str, Any],
        store: Any,
        folder: str,
        initial: list[dict[str, Value]],
        seeds: list[int],
        listener: Listener | None = None,
    ):
        self.config, self.space, self.builder, self.options = config, space, builder, options
        self.store, self.folder = store, folder
        self.listener = listener or Listener()
        self.rng = np.random.default_rng(config.seed)
        self.lineage = Lineage(config.metric, config.mode)
        self.lineage.members = [MemberRecord(m, seeds[m]) for m in range(config.size)]
        self.hparams: dict[int, dict[str, Value]] = {m: dict(h) for m, h in enumerate(initial)}
        self.origin: dict[int, dict[str, Any]] = {m: {"kind": "init"} for m in range(config.size)}
        self.ledger = CheckpointLedger()
        self.actors: dict[int, Any] = {}
        self.groups: dict[int, list[Any]] = {}
        self.timing = Timing()
        self.prefix = f"pbt-{uuid.uuid4().hex[:8]}"
        self.resumed_from: int | None = None
        self.pending_load: dict[int, str] = {}  # checkpoint a member loads before it trains
        self._committed = -math.inf

    # State ------------------------------------------------------------------------------

    @property
    def state_path(self) -> str:
        return posixpath.join(self.folder, "state.json")

    def state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "lineage": self.lineage.to_json(),
            "hparams": {str(m): h for m, h in self.hparams.items()},
            "origin": {str(m): o for m, o in self.origin.items()},
            "latest": {str(m): p for m, p in self.ledger.latest.items()},
            "rng": self.rng.bit_generator.state,
            "extra": self.listener.extra_state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a committed state (`--resume`)."""
        self.lineage = Lineage.from_json(state["lineage"])
        self.hparams = {int(m): h for m, h in state["hparams"].items()}
        self.origin = {int(m): o for m, o in state["origin"].items()}
        self.ledger = CheckpointLedger({int(m): p for m, p in state["latest"].items()})
        self.rng.bit_generator.state = state["rng"]
        live = [r.step for r in self.lineage.members if r.status != "failed"]
        self.resumed_from = min(live) if live else 0

    def commit(self, force: bool = True) -> None:
        """Write the search state (at most every `commit_every_s` unless forced), then
        delete the checkpoints it no longer names."""
        now = time.monotonic()
        if not force and now - self._committed < self.config.commit_every_s:
            return
        self.listener.flush()
        self.store.write_json(self.state_path, self.state())
        self._committed = now
        for path in self.ledger.release():
            self.store.remove(path)

    # Members ----------------------------------------------------------------------------

    def start(self) -> None:
        """Create every live member's actor (from its latest checkpoint when resuming)."""
        import ray

        for record in self.lineage.members:
            if record.status != "failed":
                self.actors[record.member] = self._spawn(record.member)
        # Process start-up is not the population's overhead: wait for it here. A member
        # that cannot be built fails its first call instead, where restarts are handled.
        refs = [a.ready.remote() for a in self.actors.values()]
        ray.wait(refs, num_returns=len(refs), timeout=600)
        self.listener.on_progress(self._done(), self._total(), self._best())

    def _spawn(self, m: int) -> Any:
        import ray

        cls = ray.remote(Member)
        restarts = self.lineage.members[m].restarts
        # Named, so that operators (and fault tests) can find a member; a restarted one
        # gets a new name, since the dead one's is released only some time after the kill.
        name = f"{self.prefix}-member-{m}" + (f"-restart-{restarts}" if restarts else "")
        return cls.options(
            name=name,
            num_cpus=self.config.member_cpus,
            num_gpus=self.config.member_gpus,
            max_restarts=0,
        ).remote(
            m,
            self.builder,
            self.lineage.members[m].seed,
            self.options,
            self.store,
            self.folder,
            self.ledger.latest.get(m),
        )

    def _release_groups(self, m: int) -> None:
        """Placement groups of a dead member's experts outlive it unless removed here."""
        import ray

        for group in self.groups.pop(m, []):
            try:
                ray.util.remove_placement_group(group)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass

    def _restart(self, m: int, reason: str) -> bool:
        """A fresh actor for member m from its last checkpoint; False once it has died
        more than `max_member_restarts` times (then it is marked failed)."""
        record = self.lineage.members[m]
        record.restarts += 1
        self._release_groups(m)
        if record.restarts > self.config.max_member_restarts:
            self._fail(m, f"{reason}; gave up after {record.restarts - 1} restarts")
            return False
        log.warning("member %d: %s; restarting from its last checkpoint", m, reason)
        self.pending_load.pop(m, None)  # the new actor starts from its latest checkpoint
        self.actors[m] = self._spawn(m)
        self.listener.on_restart(m, reason)
        return True

    def _fail(self, m: int, reason: str) -> None:
        import ray

        record = self.lineage.members[m]
        record.status = "failed"
        actor = self.actors.pop(m, None)
        if actor is not None:
            ray.kill(actor)
        self._release_groups(m)
        self.listener.on_failure(m, reason)
        if not self._live():
            raise PopulationFailed(f"every member failed; the last: member {m}: {reason}")

    def _live(self) -> list[int]:
        return [r.member for r in self.lineage.members if r.status != "failed"]

    def close(self) -> None:
        import ray

        calls = [a.close.remote() for a in self.actors.values()]
        try:
            ray.get(calls, timeout=60)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        for m, actor in list(self.actors.items()):
            ray.kill(actor)
            self._release_groups(m)
        self.actors.clear()

    def model(self, m: int) -> Any:
        import ray

        return ray.get(self.actors[m].model.remote())

    # Training ---------------------------------------------------------------------------

    def run(self) -> Lineage:
        if not self.actors:
            self.start()
        t0 = time.perf_counter()
        if self.config.synchronous:
            self._run_sync()
        else:
            self._run_async()
        self.timing.wall_seconds += time.perf_counter() - t0
        for m in self._live():
            self.lineage.members[m].status = "finished"
        self.commit()
        return self.lineage

    def _run_sync(self) -> None:
        cfg = self.config
        while True:
            live = self._live()
            step = min(self.lineage.members[m].step for m in live)
            if step >= cfg.steps:
                return
            target = min(step + cfg.ready_steps, cfg.steps)
            reports = self._round({m: target for m in live})
            for m in sorted(reports):
                self._record(m, reports[m])
            if target < cfg.steps:
                self._decide_sync(sorted(reports), target)
            self.commit(force=False)
            self.listener.on_progress(self._done(), self._total(), self._best())

    def _submit(self, m: int, target: int):
        load_from = self.pending_load.pop(m, None)
        return self.actors[m].train_until.remote(target, self.hparams[m], load_from)

    def _round(self, targets: dict[int, int]) -> dict[int, dict[str, Any]]:
        """Train each member to its target; restarts and failures handled here."""
        import ray

        pending = {self._submit(m, t): m for m, t in targets.items()}
        deadline = {ref: self._deadline() for ref in pending}
        reports: dict[int, dict[str, Any]] = {}
        while pending:
            ref, report, error = self._next(pending, deadline)
            m = pending.pop(ref)
            deadline.pop(ref)
            if report is not None:
                reports[m] = report
                continue
            if isinstance(error, ray.exceptions.RayActorError):
                if self._restart(m, f"actor died ({_brief(error)})"):
                    new = self._submit(m, targets[m])
                    pending[new], deadline[new] = m, self._deadline()
            else:
                self._fail(m, _brief(error))
        return reports

    def _deadline(self) -> float:
        limit = self.config.member_timeout_s
        return time.monotonic() + limit if limit else math.inf

    def _next(self, pending: dict, deadline: dict):
        """The next finished call -> (ref, report or None, error or None). A call past its
        deadline has its actor killed, which then reports as a dead actor."""
        import ray

        while True:
            wait = min(deadline.values()) - time.monotonic()
            timeout = None if math.isinf(wait) else max(wait, 0.0)
            done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if done:
                ref = done[0]
                try:
                    return ref, ray.get(ref), None
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    return ref, None, exc
            now = time.monotonic()
            for ref, when in deadline.items():
                if when <= now:
                    log.warning("member %d sent nothing in time; killing it", pending[ref])
                    ray.kill(self.actors[pending[ref]])
                    deadline[ref] = math.inf

    def _record(self, m: int, report: dict[str, Any]) -> Segment:
        metric = self.config.metric
        if not report["history"] and metric not in report["metrics"]:
            raise RuntimeError(f"member {m} was asked for no steps at step {report['start']}")
        if metric not in report["metrics"]:
            raise MetricMissing(
                f"metric {metric!r} is not in the trainable's report "
                f"(it reports: {', '.join(sorted(report['metrics'])) or 'nothing'})"
            )
        segment = Segment(
            start=report["start"],
            end=report["step"],
            hparams=dict(self.hparams[m]),
            score=report["metrics"][metric],
            origin=self.origin[m],
        )
        self.lineage.members[m].segments.append(segment)
        self.origin[m] = {"kind": "continue"}
        self.ledger.set_latest(m, report["checkpoint"])
        if report["placement_groups"]:
            self.groups[m] = report["placement_groups"]
        t = self.timing
        t.step_seconds[m] = t.step_seconds.get(m, 0.0) + report["step_seconds"]
        t.eval_seconds += report["eval_seconds"]
        t.save_seconds += report["save_seconds"]
        t.steps_trained += len(report["history"])
        self.listener.on_segment(m, segment, report)
        return segment

    def _scores(self) -> dict[int, float | None]:
        return {
            m: (r.segments[-1].score if r.segments else None)
            for m, r in enumerate(self.lineage.members)
            if r.status != "failed"
        }

    def _exploits(self, members: list[int] | None) -> list[policy.Exploit]:
        cfg, scores = self.config, self._scores()
        if cfg.strategy not in ("pbt", "exploit_only"):
            return []
        if members is not None:
            # Asynchronous: no donor is a member that has finished its steps (the copy
            # would have none left to train) or one that has just exploited another and
            # not trained since (its last score is not its weights' any more).
            scores = {
                k: v
                for k, v in scores.items()
                if k in members
                or (
                    self.lineage.members[k].step < cfg.steps
                    and self.origin[k].get("kind") != "exploit"
                )
            }
        if cfg.exploit == "tournament":
            return policy.tournament(scores, cfg.mode, self.rng, members)
        return policy.truncation(scores, cfg.mode, cfg.quantile, self.rng, members)

    def _explore(self, hparams: dict[str, Value]) -> tuple[dict[str, Value], dict[str, str]]:
        if self.config.strategy in ("pbt", "explore_only"):
            return policy.explore(hparams, self.space, self.rng, self.config.resample_probability)
        return dict(hparams), {}

    def _exploit_record(self, d: policy.Exploit, step: int, donor_step: int, new, ops) -> dict:
        scores = self._scores()
        return {
            "step": step,
            "member": d.member,
            "score": scores[d.member],
            "donor": d.donor,
            "donor_step": donor_step,
            "donor_score": scores[d.donor],
            "old": dict(self.hparams[d.member]),
            "new": dict(new),
            "ops": ops,
            "reason": d.reason,
        }

    def _exploit_origin(self, donor: int, ops: dict[str, str]) -> dict[str, Any]:
        """The origin of the segment a member trains after copying `donor`: with the
        donor's segment count, which says exactly whose steps the weights carry even after
        the donor has itself copied a member behind it (asynchronous PBT)."""
        count = len(self.lineage.members[donor].segments)
        return {"kind": "exploit", "donor": donor, "donor_segments": count, "ops": ops}

    def _decide_sync(self, members: list[int], step: int) -> None:
        """At a common ready step: exploit (copy in memory), then explore."""
        import ray

        decisions = self._exploits(None)
        before = {m: dict(h) for m, h in self.hparams.items()}
        latest = dict(self.ledger.latest)
        states = {d.donor: self.actors[d.donor].state.remote() for d in decisions}
        loads = {}
        for d in decisions:
            new, ops = self._explore(before[d.donor])
            record = self._exploit_record(d, step, step, new, ops)
            self.hparams[d.member] = new
            self.origin[d.member] = self._exploit_origin(d.donor, ops)
            self.ledger.set_latest(d.member, latest[d.donor])
            loads[d.member] = (self.actors[d.member].load.remote(states[d.donor]), d.donor)
            self.lineage.exploits.append(record)
            self.listener.on_exploit(record)
        for m, (ref, donor) in loads.items():
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
                self.pending_load[m] = latest[donor]  # the same weights, from storage
        if self.config.strategy == "explore_only":
            for m in members:
                new, ops = self._explore(self.hparams[m])
                self.hparams[m], self.origin[m] = new, {"kind": "explore", "ops": ops}

    def _run_async(self) -> None:
        """Each member goes on as soon as it is ready; no barrier."""
        cfg = self.config
        pending, deadline, targets = {}, {}, {}

        def submit(m: int, start: int) -> None:
            targets[m] = min(start + cfg.ready_steps, cfg.steps)
            ref = self._submit(m, targets[m])
            pending[ref], deadline[ref] = m, self._deadline()

        import ray

        for m in self._live():
            if self.lineage.members[m].step < cfg.steps:
                submit(m, self.lineage.members[m].step)
        while pending:
            ref, report, error = self._next(pending, deadline)
            m = pending.pop(ref)
            deadline.pop(ref)
            if report is None:
                if isinstance(error, ray.exceptions.RayActorError):
                    if self._restart(m, f"actor died ({_brief(error)})"):
                        submit(m, self.lineage.members[m].step)
                else:
                    self._fail(m, _brief(error))
                continue
            self._record(m, report)
            if report["step"] < cfg.steps:
                start, load_from = report["step"], None
                for d in self._exploits([m]):
                    donor = self.lineage.members[d.donor]
                    start, load_from = donor.step, self.ledger.latest[d.donor]
                    self.pending_load[m] = load_from
                    new, ops = self._explore(self.hparams[d.donor])
                    record = self._exploit_record(d, report["step"], donor.step, new, ops)
                    self.hparams[m] = new
                    self.origin[m] = self._exploit_origin(d.donor, ops)
                    self.ledger.set_latest(m, load_from)
                    self.lineage.exploits.append(record)
                    self.listener.on_exploit(record)
                if load_from is None and cfg.strategy == "explore_only":
                    new, ops = self._explore(self.hparams[m])
                    self.hparams[m], self.origin[m] = new, {"kind": "explore", "ops": ops}
                submit(m, start)
            self.commit(force=False)
            self.listener.on_progress(self._done(), self._total(), self._best())

    # Progress ---------------------------------------------------------------------------

    def _done(self) -> int:
        return sum(min(r.step, self.config.steps) for r in self.lineage.members)

    def _total(self) -> int:
        return self.config.size * self.config.steps

    def _best(self) -> float | None:
        scores = {m: s for m, s in self._scores().items() if s is not None}
        if not scores:
            return None
        return scores[policy.ranked(scores, self.config.mode)[0]]


def _brief(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    last = [line for line in text if line.strip()]
    return (last[-1] if last else type(exc).__name__)[:300]
