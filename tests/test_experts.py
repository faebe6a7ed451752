"""Experts as Ray actors: placement over nodes and GPUs, restart after a kill, and the same
answers as the in-process executor."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import actors.experts as experts_module
from actors.constraint import LMOptions
from actors.constraint.residual import RowOuter
from actors.expert import ExpertConfig
from actors.experts import (
    ENTRYPOINT_GPUS_VAR,
    InProcessExperts,
    RayExperts,
    from_wire,
    gpu_share,
    solve_experts,
    to_wire,
)
from actors.pinn import Partition, constraint_for
from flows.runtime import start_local_ray

ray = pytest.importorskip("ray")

CONFIG = ExpertConfig(
    pde="diffusion-sorption",
    parameters={"t_end": 500.0, "ridge": 1e-4},
    options=LMOptions(max_iterations=30, tolerance=1e-8),
    basis_size=6,
)


def expert_params(seed: int = 0, batch: int = 2):
    """Real expert problems: a random smooth basis on a small grid, split over 4 experts."""
    g = torch.Generator().manual_seed(seed)
    nt, nx = 6, 16
    grids = {
        "t": torch.linspace(0, 500, nt, dtype=torch.float64),
        "x": (torch.arange(nx, dtype=torch.float64) + 0.5) / nx,
    }
    constraint = constraint_for(CONFIG.pde, CONFIG.parameters)
    basis = 0.1 * torch.randn(batch, CONFIG.basis_size, nt, nx, generator=g, dtype=torch.float64)
    basis = basis.cumsum(-1) / nx  # smoother in x
    basis.requires_grad_(True)
    initial = torch.full((batch, nx), 0.1, dtype=torch.float64)
    partition = Partition((nt, nx), (1, 4))
    derivs = constraint.derivatives(basis, grids)
    params = [
        constraint.expert_params(
            derivs, initial, partition, k, partition.sample(k, 10**9, g), grids
        )
        for k in range(4)
    ]
    return basis, params


@pytest.fixture
def local_ray():
    start_local_ray(2)
    yield
    ray.shutdown()


def test_ray_experts_match_in_process_and_survive_a_kill(local_ray):
    basis, params = expert_params()
    local = InProcessExperts(CONFIG, 4)
    remote = RayExperts(CONFIG, 4)
    try:
        omegas_l, _ = solve_experts(local, params)
        omegas_r, solved = solve_experts(remote, params)
        for a, b in zip(omegas_l, omegas_r, strict=True):
            torch.testing.assert_close(a, b)
        # Gradients through both executors agree.
        (g_l,) = torch.autograd.grad(sum((w**2).sum() for w in omegas_l), basis, retain_graph=True)
        (g_r,) = torch.autograd.grad(sum((w**2).sum() for w in omegas_r), basis)
        torch.testing.assert_close(g_l, g_r)
        assert g_r.abs().sum() > 0
        assert remote.solve_seconds == [d["seconds"] for d in solved.diagnostics]
        # the work as CPU time in the actor: positive, and never more than the wall time of
        # the solve on its one torch thread (plus Ray's own threads' bit)
        for d in solved.diagnostics:
            assert 0 < d["cpu_seconds"] <= 1.5 * d["seconds"] + 0.05

        # The next solve puts the slowest expert's rows first; each expert still gets its own.
        remote.solve_seconds = [0.1, 0.4, 0.2, 0.3]
        assert remote.put_order() == [1, 3, 2, 0]
        # Kill one expert's process: Ray restarts it and the call is retried.
        before = remote.placement()[2]
        ray.kill(remote.actors[2], no_restart=False)
        _wait_gone(before["pid"])
        omegas_again, _ = solve_experts(remote, params)
        after = remote.placement()[2]
        assert after["pid"] != before["pid"]
        assert remote.restarts == 1
        for a, b in zip(omegas_r, omegas_again, strict=True):
            torch.testing.assert_close(a, b)
    finally:
        remote.close()


def _wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    """Until the killed expert's process has ended: `ray.kill` only sends the kill, and a
    call made at once can still be served by the old process (then no restart is seen)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):  # ended, not yet reaped
            return
        time.sleep(0.02)
    raise AssertionError(f"expert process {pid} still runs {timeout_s} s after ray.kill")


def test_an_expert_killed_between_its_solve_and_its_backward_gives_the_same_gradient(local_ray):
    """The restarted process no longer holds the solve's rows: it fetches them again from
    the object store, and the gradient is the one an unkilled expert gives."""
    basis, params = expert_params(seed=1)
    remote = RayExperts(CONFIG, 4)
    try:
        omegas, _ = solve_experts(remote, params)
        loss = sum((w**2).sum() for w in omegas)
        (expected,) = torch.autograd.grad(loss, basis, retain_graph=True)
        omegas, _ = solve_experts(remote, params)
        before = remote.placement()[1]["pid"]
        ray.kill(remote.actors[1], no_restart=False)
        _wait_gone(before)
        (got,) = torch.autograd.grad(sum((w**2).sum() for w in omegas), basis)
        assert remote.placement()[1]["pid"] != before and remote.restarts == 1
        torch.testing.assert_close(got, expected)
    finally:
        remote.close()


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_failed_solves_and_zeroed_gradients_are_counted(request, executor):
    """A sample whose rows hold a NaN: its solve ends `nonfinite`, its implicit gradient is
    zeroed (no NaN reaches the basis), and both are counted (the training log's lm_failures
    and ift_zeroed)."""
    from flows.train import _expert_metrics

    if executor == "ray":
        request.getfixturevalue("local_ray")
    basis, params = expert_params(seed=2)
    bad = list(params[3])
    bad[0] = bad[0].clone()
    bad[0][1, 0, 0] = float("nan")  # expert 3's first PDE row, sample 1
    params[3] = tuple(bad)
    experts = InProcessExperts(CONFIG, 4) if executor == "local" else RayExperts(CONFIG, 4)
    try:
        omegas, solved = solve_experts(experts, params)
        assert [d["nonfinite"] for d in solved.diagnostics] == [0, 0, 0, 1]
        loss = sum((w**2).sum() for w in omegas)  # the failed solve returns its last iterate
        (grad,) = torch.autograd.grad(loss, basis, retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert experts.last_vjp_zeroed == 1
        metrics = _expert_metrics(solved, 1.0, experts)
        assert metrics["lm_failures"] == 1 and metrics["ift_zeroed"] == 1
        # the next, clean backward resets the count
        basis, clean = expert_params(seed=2)
        omegas, solved = solve_experts(experts, clean)
        torch.autograd.grad(sum((w**2).sum() for w in omegas), basis)
        assert experts.last_vjp_zeroed == 0
        assert _expert_metrics(solved, 1.0, experts)["lm_failures"] == 0
    finally:
        experts.close()


def test_wire_format_round_trips_and_sends_no_tensor():
    """What experts send and receive: every tensor, however nested, travels as a NumPy
    array (Ray's raw buffers), and comes back equal, with its dtype, in memory of its own."""
    import numpy as np

    value = {
        "omega": torch.randn(2, 3, dtype=torch.float64),
        "grads": (
            RowOuter(torch.randn(2, 5, 2, dtype=torch.float64), torch.randn(2, 2, 3)),
            torch.randn(4, 3).T,  # not contiguous
        ),
        "converged": torch.tensor([True, False]),
        "diagnostics": {"iterations": [torch.tensor(3), 4.5], "name": "x"},
    }
    wire = to_wire(value)

    def leaves(x):
        if isinstance(x, RowOuter):
            return [x.coefficients, x.vectors]
        if isinstance(x, dict):
            return [y for v in x.values() for y in leaves(v)]
        if isinstance(x, (tuple, list)):
            return [y for v in x for y in leaves(v)]
        return [x]

    assert not any(isinstance(x, torch.Tensor) for x in leaves(wire))
    assert sum(isinstance(x, np.ndarray) for x in leaves(wire)) == 6
    for a in leaves(wire):  # as the object store hands them out: read-only
        if isinstance(a, np.ndarray):
            a.flags.writeable = False
    back = from_wire(wire)
    for a, b in zip(leaves(value), leaves(back), strict=True):
        if isinstance(a, torch.Tensor):
            assert b.dtype == a.dtype
            torch.testing.assert_close(b, a)
            if b.dtype == torch.bool:  # writable: memory of its own, not the wire's
                b.logical_not_()
            else:
                b.add_(1)
        else:
            assert b == a
    assert isinstance(back["grads"], tuple) and isinstance(back["grads"][0], RowOuter)
    assert isinstance(back["diagnostics"]["iterations"], list)
    torch.testing.assert_close(from_wire(wire)["omega"], value["omega"])  # wire untouched


def test_a_step_leaves_nothing_behind():
    """Once the loss and the solutions are gone, the experts' node and the rows it keeps for
    the backward are freed: training keeps one step's graph, not every step's."""
    import gc
    import weakref

    basis, params = expert_params()
    omegas, solved = solve_experts(InProcessExperts(CONFIG, 4), params)
    sum((w**2).sum() for w in omegas).backward()
    kept = weakref.ref(solved.token[0][0])  # expert 0's first row matrix, as it was solved
    del omegas, solved
    gc.collect()
    assert kept() is None


def test_batched_in_process_experts_give_what_each_alone_gives():
    """One LM loop over the four experts' problems (a GPU's default) finds each expert's
    solution, iterations and implicit gradient as its own solve does."""
    basis, params = expert_params(seed=3)
    assert len({tuple(t.shape for t in p) for p in params}) == 1  # a batch is possible
    assert InProcessExperts(CONFIG, 4).batched is False
    assert InProcessExperts(CONFIG, 4, device="cuda").batched is True
    answers = {}
    for batched in (False, True):
        experts = InProcessExperts(CONFIG, 4, batched=batched)
        omegas, solved = solve_experts(experts, params)
        (grad,) = torch.autograd.grad(sum((w**3).sum() for w in omegas), basis, retain_graph=True)
        answers[batched] = (omegas, solved.diagnostics, grad, experts.last_vjp_zeroed)
    (alone, d_alone, g_alone, z_alone), (together, d_together, g_together, z_together) = (
        answers[False],
        answers[True],
    )
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    keys = ("iterations_mean", "iterations_max", "converged_fraction", "problems")
    assert [[d[k] for k in keys] for d in d_alone] == [[d[k] for k in keys] for d in d_together]
    assert max(d["iterations_max"] for d in d_alone) > 1  # the solves did iterate
    assert len({d["seconds"] for d in d_together}) == 1  # one solve served them all
    torch.testing.assert_close(g_alone, g_together, rtol=1e-8, atol=1e-12)
    assert g_alone.abs().sum() > 0 and z_alone == z_together


def test_experts_of_different_shapes_are_solved_one_by_one_when_batched():
    basis, params = expert_params(seed=4)
    params[1] = tuple(t[:1] for t in params[1])  # one sample fewer: no common batch
    experts = InProcessExperts(CONFIG, 4, batched=True)
    omegas, solved = solve_experts(experts, params)
    assert [w.shape[0] for w in omegas] == [2, 1, 2, 2]
    alone = InProcessExperts(CONFIG, 4, batched=False)
    for a, b in zip(omegas, solve_experts(alone, params)[0], strict=True):
        torch.testing.assert_close(a, b)


def test_gpu_shares_fill_whole_gpus():
    assert gpu_share(0, 4) == 0.0
    assert gpu_share(4, 4) == gpu_share(8, 4) == 1.0
    assert gpu_share(4, 8) == gpu_share(3, 4) == gpu_share(4, 6) == 0.5
    assert gpu_share(2, 5) == pytest.approx(1 / 3)
    assert gpu_share(0.5, 2) == 0.25  # part of one GPU: shared by all


def test_one_expert_per_gpu_across_two_nodes(monkeypatch, caplog):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    nodes = [cluster.add_node(num_cpus=2, num_gpus=2) for _ in range(2)]
    try:
        ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
        cluster.wait_for_nodes()
        experts = RayExperts(CONFIG, 4, cpus_per_expert=0.5)
        try:
            where = experts.placement()
            assert experts.bundle == {"CPU": 0.5, "GPU": 1.0}
            slots = {(w["node_id"], tuple(w["gpu_ids"])) for w in where}
            assert len(slots) == 4, where  # four distinct GPUs
            assert all(len(w["gpu_ids"]) == 1 for w in where)
            worker_nodes = {n.node_id for n in nodes}
            assert {w["node_id"] for w in where} == worker_nodes  # both nodes used
            assert all(w["device"] == "cpu" for w in where)  # declared GPUs, no CUDA here
        finally:
            experts.close()
        # More experts than GPUs: equal fractions that fill whole GPUs, still spread over
        # both nodes. Six on four GPUs share them in pairs (2/3 each would never place:
        # Ray puts a fraction inside one GPU).
        for count in (8, 6):
            experts = RayExperts(CONFIG, count, cpus_per_expert=0.25)
            try:
                assert experts.bundle["GPU"] == 0.5
                where = experts.placement()
                assert {w["node_id"] for w in where} == {n.node_id for n in nodes}
                slots = Counter((w["node_id"], tuple(w["gpu_ids"])) for w in where)
                assert max(slots.values()) == 2 and sum(slots.values()) == count
            finally:
                experts.close()
        # A GPU held by the job's driver (a RayJob's entrypointNumGpus: the network trains
        # there): four experts share the three left, two to a GPU, instead of asking for
        # four whole ones that never come.
        driver = ray.remote(num_gpus=1, num_cpus=0)(Holder).remote()
        ray.get(driver.ready.remote())
        os.environ[ENTRYPOINT_GPUS_VAR] = "1"
        try:
            experts = RayExperts(CONFIG, 4, cpus_per_expert=0.5)
            assert experts.bundle["GPU"] == 0.5
            assert len(experts.placement()) == 4
            experts.close()
        finally:
            del os.environ[ENTRYPOINT_GPUS_VAR]
            ray.kill(driver)
        # More GPUs than the cluster has: it says what it waits for (an autoscaled cluster
        # would be starting GPU nodes), then gives up with one line
        monkeypatch.setitem(experts_module.PLACEMENT_WAIT_S, True, 12)
        with pytest.raises(RuntimeError, match=r"cannot place 5 experts with \{'CPU': 0.5"):
            RayExperts(CONFIG, 5, gpus_per_expert=1.0, cpus_per_expert=0.5)
        assert "waiting up to 12 s for the Ray cluster to place 5 experts" in caplog.text
    finally:
        ray.shutdown()
        cluster.shutdown()


class Holder:
    def ready(self) -> bool:
        return True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_model_on_the_gpu_trains_with_ray_experts(local_ray):
    """The device path of training on a GPU machine: the model on the GPU, its experts Ray
    actors that answer through the host. One loss and backward run (the rows gathered with
    host-drawn points, the omegas brought back to the GPU), and u and every parameter's
    gradient are on the GPU and finite."""
    from actors.surrogate import PDESurrogate

    nt, nx = 6, 16
    grids = {
        "t": torch.linspace(0, 500, nt, dtype=torch.float64),
        "x": (torch.arange(nx, dtype=torch.float64) + 0.5) / nx,
    }
    model = PDESurrogate(
        "moe", CONFIG.pde, CONFIG.parameters, grids, 4, 8, 3, 1, (1, 4), CONFIG.options, 20
    ).to("cuda")
    model.executor = RayExperts(model.expert_config(), model.num_experts)
    try:
        initial = torch.full((2, nx), 0.1, device="cuda")
        loss, u, solved = model.loss(initial, torch.Generator().manual_seed(0))
        loss.backward()
        assert u.device.type == "cuda" and torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.device.type == "cuda", name
            assert torch.isfinite(p.grad).all(), name
        assert len(solved.diagnostics) == 4
    finally:
        model.executor.close()


_HEAP_PROBE = """
import resource, sys
import numpy as np
from actors.heap import use_in_this_process
if sys.argv[1] == "set":
    assert use_in_this_process()
counts = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [np.ones(13 * 2**20 // 8) for _ in range(3)]  # a step's three 13 MB temporaries
    del buffers
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(counts[2:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_driver_takes_the_experts_heap_settings_and_stops_page_faulting_its_buffers():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _HEAP_PROBE, mode],
            env=env,
            cwd=Path(__file__).resolve().parents[1],  # where `actors` is
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    # glibc's sliding thresholds give part of the freed buffers back to the system and
    # fault them in again on every round (about 1 000 pages); the settings keep them
    assert faults("default") > 200
    assert faults("set") < 20
