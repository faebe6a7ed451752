"""Evaluator pools: where validations run. The search driver sees one interface,

    pool.capacity            how many validations may run at once
    pool.submit(key, config) queue one
    pool.next_done()         block until one finishes -> Outcome (result or error)

`InProcessPool` runs each one in this process (tests, tiny jobs). `EvaluatorPool` runs them on
Ray actors, each loading the super-network once. Work is handed out asynchronously: an actor
takes the next queued candidate as soon as it is free, so a slow evaluation holds up only its
own actor (`mode="sync"` instead waits for a whole round, for comparison). An actor that dies
is replaced; its candidate, like any failed evaluation, is retried once on another actor and
then reported as failed — failure is data here, since an exception crossing the actor
boundary loses its context.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from actors.nas.space import Config, Key


@dataclass
class Outcome:
    key: Key
    config: Config
    result: dict[str, float] | None  # None when every attempt failed
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0  # time the evaluator spent on the successful attempt
    actor: str = "in-process"
    failed_on: tuple[str, ...] = ()  # every actor an unsuccessful attempt ran on


class InProcessPool:
    """Validations one at a time in this process."""

    capacity = 1

    def __init__(self, evaluator: Any):
        self.evaluator = evaluator
        self.queue: deque[tuple[Key, Config]] = deque()
        self.busy_seconds = 0.0
        self.restarts = 0
        self.first_submit: float | None = None
        self.last_done: float | None = None

    def submit(self, key: Key, config: Config) -> None:
        if self.first_submit is None:
            self.first_submit = time.perf_counter()
        self.queue.append((key, config))

    def next_done(self) -> Outcome:
        key, config = self.queue.popleft()
        start = time.perf_counter()
        try:
            result = self.evaluator.evaluate(config)
        except Exception as exc:  # noqa: BLE001 - a failed validation is recorded, not raised
            return Outcome(key, config, None, _brief(exc))
        seconds = time.perf_counter() - start
        self.busy_seconds += seconds
        self.last_done = time.perf_counter()
        return Outcome(key, config, result, seconds=seconds)

    def efficiency(self) -> float:
        return _efficiency(self.busy_seconds, self.capacity, self.first_submit, self.last_done)

    def close(self) -> None:
        self.queue.clear()


class EvaluatorActor:
    """The Ray actor: one evaluator (built once from the shared setup) on Ray's device."""

    def __init__(self, evaluator_cls: type, setup: Any, threads: int):
        import ray
        import torch

        torch.set_num_threads(threads)  # latency is only comparable at a fixed thread count
        gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
        self.evaluator = evaluator_cls(setup, device)

    def ready(self) -> bool:
        return True

    def evaluate(self, config: Config) -> dict[str, Any]:
        start_wall, start = time.time(), time.perf_counter()
        result = self.evaluator.evaluate(config)
        return {"result": result, "start": start_wall, "seconds": time.perf_counter() - start}


@dataclass
class _Task:
    key: Key
    config: Config
    attempts: int = 0
    tried_on: set[str] = field(default_factory=set)
    last_error: str | None = None


class EvaluatorPool:
    """`actors` Ray actors of `EvaluatorActor(evaluator_cls, setup)`; `setup` is put in the
    object store once and shared by all of them."""

    def __init__(
        self,
        evaluator_cls: type,
        setup: Any,
        actors: int,
        cpus_per_actor: float = 1.0,
        gpus_per_actor: float = 0.0,
        threads: int = 1,
        mode: Literal["async", "sync"] = "async",
        max_attempts: int = 2,
    ):
        import ray

        self.capacity = actors
        self.mode = mode
        self.max_attempts = max_attempts
        self._cls = ray.remote(EvaluatorActor)
        self._resources = {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor}
        self._args = (evaluator_cls, ray.put(setup), threads)
        self.prefix = f"physflow-nas-{uuid.uuid4().hex[:8]}"
        self._made = 0
        self.actors: list[tuple[str, Any]] = [self._new_actor() for _ in range(actors)]
        # Start-up (process, imports, loading the super-network) is not evaluation time.
        ray.get([actor.ready.remote() for _, actor in self.actors])
        self.idle = list(range(actors))
        self.queue: deque[_Task] = deque()
        self.running: dict[Any, tuple[int, _Task]] = {}
        self.restarts = 0
        self.reset_statistics()

    def reset_statistics(self) -> None:
        """Start measuring busy time and efficiency afresh (the actors stay)."""
        self.busy_seconds = 0.0
        self.intervals: list[tuple[str, float, float]] = []  # (actor, start, end) wall clock
        self.first_submit: float | None = None
        self.last_done: float | None = None

    def _new_actor(self) -> tuple[str, Any]:
        name = f"{self.prefix}-{self._made}"
        self._made += 1
        return name, self._cls.options(name=name, **self._resources).remote(*self._args)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.actors]

    def submit(self, key: Key, config: Config) -> None:
        if self.first_submit is None:
            self.first_submit = time.perf_counter()
        self.queue.append(_Task(key, dict(config)))

    def _dispatch(self) -> None:
        if self.mode == "sync" and self.running:
            return  # a round ends when its last evaluation does
        for task in list(self.queue):
            if not self.idle:
                return
            # a retry goes to an actor it has not failed on, if there is one
            fresh = [i for i in self.idle if self.actors[i][0] not in task.tried_on]
            if not fresh and len(self.actors) > 1 and task.tried_on:
                continue
            index = (fresh or self.idle)[0]
            self.idle.remove(index)
            self.queue.remove(task)
            task.attempts += 1
            name, actor = self.actors[index]
            self.running[actor.evaluate.remote(task.config)] = (index, task)

    def next_done(self) -> Outcome:
        import ray
        from ray.exceptions import RayActorError

        while True:
            self._dispatch()
            if not self.running:
                raise RuntimeError("next_done() with nothing submitted")
            (ref,), _ = ray.wait(list(self.running), num_returns=1)
            index, task = self.running.pop(ref)
            name = self.actors[index][0]
            try:
                out = ray.get(ref)
            except RayActorError as exc:
                # the actor is gone: a replacement takes its place, the task is retried
                self.actors[index] = self._new_actor()
                self.restarts += 1
                task.last_error = f"evaluator {name} died ({_brief(exc)})"
            except Exception as exc:  # noqa: BLE001 - RayTaskError wraps any user exception
                task.last_error = _brief(exc)
            else:
                self.idle.append(index)
                self._record(name, out)
                return Outcome(
                    task.key, task.config, out["result"], None, task.attempts, out["seconds"], name
                )
            self.idle.append(index)
            task.tried_on.add(name)
            if task.attempts < self.max_attempts:
                self.queue.appendleft(task)
                continue
            self.last_done = time.perf_counter()
            return Outcome(
                task.key,
                task.config,
                None,
                task.last_error,
                task.attempts,
                actor=name,
                failed_on=tuple(sorted(task.tried_on)),
            )

    def _record(self, name: str, out: dict[str, Any]) -> None:
        self.busy_seconds += out["seconds"]
        self.intervals.append((name, out["start"], out["start"] + out["seconds"]))
        self.last_done = time.perf_counter()

    def efficiency(self) -> float:
        return _efficiency(self.busy_seconds, self.capacity, self.first_submit, self.last_done)

    def close(self) -> None:
        import ray

        for _, actor in self.actors:
            ray.kill(actor)
        self.actors, self.running, self.idle = [], {}, []


def _efficiency(busy: float, actors: int, first: float | None, last: float | None) -> float:
    """Busy time / (actors x wall time from the first submit to the last result)."""
    if first is None or last is None or last <= first:
        return 0.0
    return busy / (actors * (last - first))


def _brief(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]
