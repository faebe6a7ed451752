"""The experts of a model, in-process or as Ray actors, behind one interface.

    executor.solve([params_k for k in experts])           -> Solved(omegas, diagnostics, token)
    executor.vjp(token, omegas, [omega_bar_k ...])        -> [grads_k ...]

`ExpertsFunction` turns that into an autograd node on the driver: the forward hands each
expert only its own slice of the basis (through the object store under Ray), the backward
sends each expert its ω̄ and receives the gradient w.r.t. its slice, computed by the
implicit function theorem on the expert's device.

Ray experts are placed with a placement group, one bundle per expert, spread over nodes:
one GPU each where there are enough GPUs, equal fractions of a GPU where experts outnumber
them, CPUs otherwise. An expert process that dies is restarted by Ray and the call retried
(the solver keeps no state between calls); restarts are counted from the experts'
incarnation ids and reported with the diagnostics.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actors.constraint.residual import RowOuter, dense
from actors.expert import ExpertConfig, ExpertSolver
from actors.heap import HEAP_ENV

Params = tuple[torch.Tensor, ...]
log = logging.getLogger(__name__)
# How long experts wait to be placed: without GPUs, and with (an autoscaler's new GPU node)
PLACEMENT_WAIT_S = {False: 120, True: 900}
# The GPUs the job's driver holds for itself (see `RayExperts`)
ENTRYPOINT_GPUS_VAR = "PHYSFLOW_ENTRYPOINT_GPUS"


@dataclass
class Solved:
    omegas: list[torch.Tensor]  # per expert (B, N)
    diagnostics: list[dict[str, Any]]  # per expert
    token: Any  # what the backward needs to find the forward's inputs again
    seconds: float = 0.0  # wall time of the whole parallel solve


@dataclass
class InProcessExperts:
    """Every expert in this process: tiny problems, tests, and a model on one GPU. With
    `batched` (the default on a GPU) experts whose inputs have the same shapes solve as
    one batch of all their problems (`ExpertSolver.solve_all`: the same solutions, one
    launch of each kernel instead of one per expert); otherwise one after the other."""

    config: ExpertConfig
    num_experts: int
    device: str = "cpu"  # the model's: results stay there, no round trip through the host
    batched: bool | None = None  # None: on a GPU
    restarts: int = 0
    last_vjp_seconds: float = 0.0  # wall time of the latest backward through the experts
    last_vjp_zeroed: int = 0  # problems whose implicit gradient the latest backward zeroed
    solvers: list[ExpertSolver] = field(init=False)

    def __post_init__(self) -> None:
        if self.batched is None:
            self.batched = torch.device(self.device).type == "cuda"
        self.solvers = [
            ExpertSolver(self.config, self.device, keep_on_device=True)
            for _ in range(self.num_experts)
        ]

    def _together(self, params: list[Params]) -> bool:
        """Whether these experts' inputs can be solved as one batch."""
        if not self.batched or len(params) < 2:
            return False
        shapes = {tuple((tuple(t.shape), t.dtype) for t in p) for p in params}
        return len(shapes) == 1

    def solve(self, params: list[Params]) -> Solved:
        t0 = time.perf_counter()
        if self._together(params):
            out = self.solvers[0].solve_all(params)
        else:
            out = [s.solve(p) for s, p in zip(self.solvers, params, strict=True)]
        return Solved(
            [o["omega"] for o in out],
            [o["diagnostics"] for o in out],
            params,
            time.perf_counter() - t0,
        )

    def vjp(self, token: list[Params], omegas, omega_bars) -> list[tuple[torch.Tensor, ...]]:
        t0 = time.perf_counter()
        if self._together(token):
            out = self.solvers[0].vjp_all(token, list(omegas), list(omega_bars))
        else:
            out = [
                s.vjp(p, w, wb)
                for s, p, w, wb in zip(self.solvers, token, omegas, omega_bars, strict=True)
            ]
        self.last_vjp_seconds = time.perf_counter() - t0
        self.last_vjp_zeroed = zeroed(out)
        return [o["grads"] for o in out]

    def placement(self) -> list[dict[str, Any]]:
        return [s.where() for s in self.solvers]

    def close(self) -> None:
        pass


def gpu_share(gpus: float, num_experts: int) -> float:
    """Each expert's fraction of a GPU: a whole one where there are enough, else
    1 / (experts per GPU), so that the fractions fill whole GPUs. (Ray places a fraction
    only inside one GPU: four experts of 3/4 each on three GPUs would never place.)"""
    if gpus <= 0:
        return 0.0
    whole = math.floor(gpus)
    if whole == 0:  # part of one GPU in all: the experts share it
        return gpus / num_experts
    return 1.0 / math.ceil(num_experts / whole)


class RayExperts:
    """One Ray actor per expert, placed by a placement group."""

    def __init__(
        self,
        config: ExpertConfig,
        num_experts: int,
        gpus_per_expert: float | None = None,
        cpus_per_expert: float | None = None,
        max_restarts: int = 3,
        strategy: str = "SPREAD",
    ):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.config = config
        self.num_experts = num_experts
        resources = ray.cluster_resources()
        # Less the GPUs of a driver that trains the network on its own (a RayJob's
        # entrypointNumGpus, which physflow's RayJobs also give in this variable): experts
        # asking for those would never place. (Not Ray's available GPUs: a placement group
        # just removed, by the run before, still counts there for a while.)
        held = float(os.environ.get(ENTRYPOINT_GPUS_VAR) or 0)
        gpus = max(resources.get("GPU", 0.0) - held, 0.0)
        cpus = resources.get("CPU", 1.0)
        if gpus_per_expert is None:
            gpus_per_expert = gpu_share(gpus, num_experts)
        if cpus_per_expert is None:
            # Leave the driver a core; share what is left when experts outnumber cores.
            cpus_per_expert = min(1.0, max(cpus - 1, 1) / num_experts)
        bundle = {"CPU": cpus_per_expert}
        if gpus_per_expert:
            bundle["GPU"] = gpus_per_expert
        self.bundle = bundle
        self.group = placement_group([dict(bundle) for _ in range(num_experts)], strategy=strategy)
        ready, _ = ray.wait([self.group.ready()], timeout=10)
        if not ready:
            # an autoscaled cluster starts GPU nodes for them: minutes, not seconds
            wait_s = PLACEMENT_WAIT_S["GPU" in bundle]
            log.warning(
                "waiting up to %d s for the Ray cluster to place %d experts with %s each",
                wait_s, num_experts, bundle,
            )  # fmt: skip
            ready, _ = ray.wait([self.group.ready()], timeout=wait_s - 10)
        if not ready:
            ray.util.remove_placement_group(self.group)
            raise RuntimeError(
                f"cannot place {num_experts} experts with {bundle} each on this Ray cluster "
                f"({cpus:g} CPUs, {gpus:g} GPUs)"
            )
        actor_cls = ray.remote(ExpertActor)
        # Named, so that operators (and fault tests) can find an expert: physflow-<id>-expert-k
        self.prefix = f"physflow-{uuid.uuid4().hex[:8]}"
        self.actors = [
            actor_cls.options(
                name=f"{self.prefix}-expert-{k}",
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                max_restarts=max_restarts,
                max_task_retries=max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.group, placement_group_bundle_index=k
                ),
                runtime_env={"env_vars": dict(HEAP_ENV)},
            ).remote(config)
            for k in range(num_experts)
        ]
        self.incarnations = [w["incarnation"] for w in self.placement()]
        self.restarts = 0
        self.last_vjp_seconds = 0.0
        self.last_vjp_zeroed = 0
        self.solve_seconds = [0.0] * num_experts  # each expert's latest solve, in the actor

    def _note(self, results: list[dict[str, Any]]) -> None:
        for k, r in enumerate(results):
            if r["incarnation"] != self.incarnations[k]:
                self.incarnations[k] = r["incarnation"]
                self.restarts += 1

    def solve(self, params: list[Params]) -> Solved:
        import ray

        if len(params) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} experts' params, got {len(params)}")
        t0 = time.perf_counter()
        # Each expert receives only its own slice, as NumPy arrays (Ray stores those as raw
        # buffers; a pickled tensor costs ~5x as much to put and to read), and starts as
        # soon as its slice is stored, while the next one is put. The slices are put
        # longest solve first (by the previous step's times): the driver's puts take
        # about as long as a short solve, and the expert that bounds the step should not
        # wait for the others' puts.
        refs: list[Any] = [None] * self.num_experts
        calls: list[Any] = [None] * self.num_experts
        token = uuid.uuid4().hex
        for k in self.put_order():
            refs[k] = ray.put(to_wire(params[k]))
            calls[k] = self.actors[k].solve.remote(refs[k], token)
        results = from_wire(ray.get(calls))
        self._note(results)
        self.solve_seconds = [r["diagnostics"]["seconds"] for r in results]
        return Solved(
            [r["omega"] for r in results],
            [r["diagnostics"] for r in results],
            (token, refs),
            time.perf_counter() - t0,
        )

    def put_order(self) -> list[int]:
        """Experts by their previous solve's time, longest first (in order at first)."""
        return sorted(range(self.num_experts), key=lambda k: -self.solve_seconds[k])

    def vjp(self, token, omegas, omega_bars) -> list[tuple[torch.Tensor, ...]]:
        import ray

        t0 = time.perf_counter()
        step, refs = token
        # each ref inside a list: Ray then passes it unresolved, and the expert fetches the
        # rows again only if it no longer holds them (a restarted process)
        calls = [
            a.vjp.remote(step, [ref], to_wire(w), to_wire(wb))
            for a, ref, w, wb in zip(self.actors, refs, omegas, omega_bars, strict=True)
        ]
        results = from_wire(ray.get(calls))
        self._note(results)
        self.last_vjp_seconds = time.perf_counter() - t0
        self.last_vjp_zeroed = zeroed(results)
        return [r["grads"] for r in results]

    def placement(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([a.where.remote() for a in self.actors])

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        ray.util.remove_placement_group(self.group)


class ExpertActor:
    """The Ray actor: an ExpertSolver on the device Ray assigned to it."""

    def __init__(self, config: ExpertConfig):
        import ray

        gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        device = "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"
        torch.set_num_threads(1)  # one expert per core; BLAS threads would oversubscribe
        self.solver = ExpertSolver(config, device)
        self.gpu_ids = [str(g) for g in gpu_ids]
        self.held: tuple[str, Params] | None = None  # the latest solve's rows, for its vjp

    def solve(self, params: tuple[np.ndarray, ...], token: str) -> dict[str, Any]:
        tensors = from_wire(params)
        self.held = (token, tensors)
        return to_wire(self.solver.solve(tensors))

    def vjp(
        self, token: str, ref: list, omega: np.ndarray, omega_bar: np.ndarray
    ) -> dict[str, Any]:
        """The backward of the solve `token`, on the rows kept from it; a restarted
        process, which holds none, fetches them again from the object store."""
        import ray

        if self.held is not None and self.held[0] == token:
            tensors = self.held[1]
        else:
            tensors = from_wire(ray.get(ref[0]))
        self.held = None
        return to_wire(self.solver.vjp(tensors, from_wire(omega), from_wire(omega_bar)))

    def where(self) -> dict[str, Any]:
        import ray

        return {
            **self.solver.where(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": self.gpu_ids,
        }


def zeroed(results: list[dict[str, Any]]) -> int:
    """How many problems of a backward got a zero gradient (H singular or not finite), summed
    over the experts' answers."""
    return sum(int(r["diagnostics"].get("singular", 0)) for r in results)


def to_wire(value: Any) -> Any:
    """Tensors as NumPy arrays, also inside tuples, lists, dicts and `RowOuter` factors:
    Ray sends NumPy arrays as raw buffers (zero-copy from the object store), a tensor
    pickled whole. Four experts' gradients come back in 8 ms as arrays, 20 ms as tensors."""
    return _convert(value, torch.Tensor, lambda t: t.detach().cpu().contiguous().numpy())


def from_wire(value: Any) -> Any:
    """`to_wire`'s inverse. The object store's arrays are read-only views of shared memory:
    copied, so that nothing can write into them (and the store can free them)."""
    return _convert(value, np.ndarray, lambda a: torch.from_numpy(np.array(a, copy=True)))


def _convert(value: Any, kind: type, convert) -> Any:
    """`value` with every `kind` in it, however nested, replaced by `convert` of it."""
    if isinstance(value, kind):
        return convert(value)
    if isinstance(value, RowOuter):
        return RowOuter(*(_convert(f, kind, convert) for f in (value.coefficients, value.vectors)))
    if isinstance(value, dict):
        return {k: _convert(v, kind, convert) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_convert(v, kind, convert) for v in value)
    return value


class ExpertsFunction(torch.autograd.Function):
    """Autograd node for all experts' solves: inputs are every expert's params, flattened;
    outputs are every expert's ω."""

    @staticmethod
    def forward(ctx, executor, sizes: list[int], record: dict, *flat: torch.Tensor):
        params, i = [], 0
        for n in sizes:
            params.append(tuple(t.detach() for t in flat[i : i + n]))
            i += n
        solved = executor.solve(params)
        ctx.executor, ctx.token = executor, solved.token
        ctx.dtypes = [t.dtype for t in flat]
        ctx.devices = [t.device for t in flat]
        # where the model is: Ray experts answer through the host, from whatever device
        omegas = [w.to(flat[0].device) for w in solved.omegas]
        # The omegas are this node's outputs: kept as a ctx attribute they would hold the
        # node that holds them, and every step's graph (and rows) would stay in memory.
        ctx.save_for_backward(*omegas)
        record["solved"] = solved
        return tuple(omegas)

    @staticmethod
    def backward(ctx, *omega_bars):
        omegas = list(ctx.saved_tensors)
        grads = ctx.executor.vjp(ctx.token, omegas, [g.contiguous() for g in omega_bars])
        # to the inputs' device before expanding: a row matrix's factors are N / 2 smaller
        flat = [g for per_expert in grads for g in per_expert]
        return (
            None,
            None,
            None,
            *(
                dense(g.to(device=d, dtype=dt))
                for g, d, dt in zip(flat, ctx.devices, ctx.dtypes, strict=True)
            ),
        )


def solve_experts(executor, params: list[Params]) -> tuple[list[torch.Tensor], Solved]:
    """Differentiable ω per expert; the Solved record carries diagnostics and timings."""
    record: dict[str, Any] = {}
    sizes = [len(p) for p in params]
    flat = [t for p in params for t in p]
    omegas = ExpertsFunction.apply(executor, sizes, record, *flat)
    return list(omegas), record["solved"]
