"""Checks of the physics-network building blocks (actors.pinn) against independent truth.

References come from outside the code under test: closed-form fields and their analytic
derivatives, exact PDE solutions (with the data generator's boundary conditions), the
numpy simulators of actors.pde, numpy's array_split, finite differences of the residual
functions, and a second code path through the same maths. Numerical checks run in
float64 on small grids.
"""

from __future__ import annotations

import itertools
import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from actors.constraint import implicit_vjp, optimality
from actors.pde import DiffusionSorption, gaussian_random_field
from actors.pde import navier_stokes as ns_simulator
from actors.pinn import (
    FNO,
    BasisNetwork,
    DiffusionSorptionConstraint,
    NavierStokesConstraint,
    Partition,
    Pointwise,
    SoftConstrained,
    SpectralConv,
    assemble,
    constraint_for,
    diffusion_sorption_residual,
    expert_problems,
    navier_stokes_residual,
    solve_in_process,
)
from actors.pinn.rows import gather_blocks, gather_rows
from actors.pinn.stencils import first_derivative, lagrange_weights, second_derivative, trace

# torch.func's forward mode loads torch's own TorchScript decompositions on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

F64 = torch.float64
D = 5e-4  # PDEBench diffusivity


def ds_grids(nt: int, nx: int, t_end: float = 500.0) -> dict[str, torch.Tensor]:
    return {
        "t": torch.linspace(0.0, t_end, nt, dtype=F64),
        "x": (torch.arange(nx, dtype=F64) + 0.5) / nx,
    }


def ns_grids(nt: int, n: int, t_end: float) -> dict[str, torch.Tensor]:
    x = torch.arange(n, dtype=F64) / n
    return {"t": torch.linspace(0.0, t_end, nt, dtype=F64), "x": x, "y": x.clone()}


def observed_order(errors: list[float]) -> list[float]:
    """log2 of successive error ratios when the spacing halves."""
    return [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]


# ---------------------------------------------------------------------------
# Partition
# ---------------------------------------------------------------------------

PARTITIONS = [
    ((8, 12), (1, 4)),  # even
    ((7, 10), (2, 3)),  # uneven on both axes
    ((6, 5, 7), (1, 2, 2)),  # 3-D, uneven
    ((5, 9, 4), (2, 3, 4)),  # 3-D, one point wide blocks on the last axis
]


@pytest.mark.parametrize("shape, splits", PARTITIONS)
def test_partition_split_merge_are_exact_inverses(shape, splits):
    p = Partition(shape, splits)
    field = torch.randn(2, 3, *shape, dtype=F64)
    parts = p.split(field)
    assert len(parts) == p.num_experts == int(np.prod(splits))
    assert torch.equal(p.merge(parts), field)
    # block sizes are np.array_split's, in C order over the block multi-index
    for k, part in enumerate(parts):
        block = np.unravel_index(k, splits)
        sizes = [
            len(np.array_split(np.arange(n), s)[b])
            for n, s, b in zip(shape, splits, block, strict=True)
        ]
        assert part.shape == (2, 3, int(np.prod(sizes)))
        assert torch.equal(part, field[(..., *p.slices(k))].reshape(2, 3, -1))


@pytest.mark.parametrize("shape, splits", PARTITIONS)
def test_partition_covers_every_point_exactly_once(shape, splits):
    p = Partition(shape, splits)
    assert torch.equal(p.masks.sum(0), torch.ones(shape, dtype=torch.long))
    every = torch.cat([p.index(k) for k in range(p.num_experts)]).sort().values
    assert torch.equal(every, torch.arange(int(np.prod(shape))))
    for k in range(p.num_experts):
        assert torch.equal(p.index(k), p.mask(k).flatten().nonzero().flatten())
        assert bool((p.owner[p.mask(k)] == k).all())


@pytest.mark.parametrize("shape, splits", PARTITIONS)
def test_partition_sample_stays_inside_its_subdomain(shape, splits):
    p = Partition(shape, splits)
    gen = torch.Generator().manual_seed(0)
    for k in range(p.num_experts):
        n_k = p.size(k)
        m = max(1, n_k // 2)
        pts = p.sample(k, m, gen)
        assert pts.shape == (m,) and pts.unique().numel() == m  # without replacement
        assert bool(p.mask(k).flatten()[pts].all())
        assert torch.equal(p.sample(k, n_k + 5, gen), p.index(k))  # m > n_k: all points
    draws = {tuple(p.sample(0, 2, gen).tolist()) for _ in range(20)}
    assert len(draws) > 1 or p.size(0) <= 2  # redrawn each call


def test_partition_sample_leaves_out_the_first_time_levels():
    p = Partition((6, 8), (2, 2))  # blocks of 3 time levels x 4 cells
    gen = torch.Generator().manual_seed(0)
    first = p.sample(0, 100, gen, first_level=2)  # block 0: levels 0-2, only level 2 left
    assert torch.equal(first, p.index(0)[p.index(0) >= 16])
    assert bool((p.sample(0, 3, gen, first_level=2) >= 16).all())
    assert torch.equal(p.sample(2, 100, gen, first_level=2), p.index(2))  # levels 3-5: all
    # a block entirely inside the left-out levels keeps its points (no empty problem)
    assert torch.equal(p.sample(1, 100, gen, first_level=3), p.index(1))


def test_partition_single_expert_holds_all_points():
    p = Partition((5, 7), (1, 1))
    assert p.num_experts == 1
    assert torch.equal(p.index(0), torch.arange(35))
    field = torch.randn(3, 5, 7)
    assert torch.equal(p.split(field)[0], field.reshape(3, 35))


def test_partition_merge_is_differentiable():
    p = Partition((4, 6), (2, 2))
    parts = [torch.randn(2, p.size(k), dtype=F64, requires_grad=True) for k in range(4)]
    weights = torch.randn(2, 4, 6, dtype=F64)
    (p.merge(parts) * weights).sum().backward()
    for k, part in enumerate(parts):
        assert torch.equal(part.grad, p.split(weights)[k])


def test_partition_rejects_bad_arguments():
    with pytest.raises(ValueError, match="splits"):
        Partition((4, 6), (2,))
    with pytest.raises(ValueError, match="splits"):
        Partition((4, 6), (1, 7))
    with pytest.raises(ValueError, match="grid_shape"):
        Partition((4, 0), (1, 1))
    p = Partition((4, 6), (1, 2))
    with pytest.raises(ValueError, match="m must"):
        p.sample(0, 0)
    with pytest.raises(ValueError, match="k = 2"):
        p.index(2)
    with pytest.raises(ValueError, match="field"):
        p.split(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="parts"):
        p.merge([torch.zeros(12)])


# ---------------------------------------------------------------------------
# FNO
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dims, grid, padding",
    [(2, (9, 12), 3), (2, (9, 12), (2, 2)), (3, (5, 8, 6), 2), (3, (5, 8, 6), (2, 0, 0))],
)
def test_fno_output_shape(dims, grid, padding):
    net = FNO(dims, 3, 5, width=6, modes=3, layers=2, padding=padding)
    assert net(torch.randn(2, 3, *grid)).shape == (2, 5, *grid)


def test_fno_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = FNO(2, 3, 4, width=8, modes=3, layers=3, padding=(2, 2)).double()
    net(torch.randn(2, 3, 10, 12, dtype=F64)).square().sum().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_pointwise_layer_is_a_1x1_convolution(dims):
    """Values and gradients equal those of torch's convolution with the same parameters,
    which keep nn.ConvNd's names and shapes (checkpoints of either load into the other)."""
    torch.manual_seed(0)
    layer = Pointwise(dims, 3, 5).double()
    conv = getattr(torch.nn, f"Conv{dims}d")(3, 5, 1).double()
    assert {k: v.shape for k, v in layer.state_dict().items()} == {
        k: v.shape for k, v in conv.state_dict().items()
    }
    conv.load_state_dict(layer.state_dict())
    grid = (7, 6, 5)[:dims]
    x = torch.randn(2, 3, 10, *grid[1:], dtype=F64)[..., : grid[0]]  # strided, as after a crop
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), conv(x2)
    assert torch.allclose(y1, y2, atol=1e-13)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-13)
    for name in ("weight", "bias"):
        assert torch.allclose(getattr(layer, name).grad, getattr(conv, name).grad, atol=1e-12)


def plane_wave(grid: tuple[int, ...], k: tuple[int, ...], phase: float = 0.0) -> torch.Tensor:
    """cos(2 pi sum_a k_a i_a / n_a + phase) on the grid."""
    axes = torch.meshgrid(*(torch.arange(n, dtype=F64) / n for n in grid), indexing="ij")
    theta = sum(2 * math.pi * ka * xa for ka, xa in zip(k, axes, strict=True))
    return torch.cos(theta + phase)


def identity_spectral_conv(dims: int, channels: int, modes: int) -> SpectralConv:
    conv = SpectralConv(dims, channels, channels, modes).double()
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(channels):
            conv.weight[c, c, ..., 0] = 1.0  # real part 1 on every kept mode
    return conv


def test_spectral_conv_identity_keeps_low_modes_and_drops_high_ones():
    grid, modes = (12, 14), 4
    low = [plane_wave(grid, (1, 2)), plane_wave(grid, (-3, 3), 0.4), plane_wave(grid, (0, 1))]
    high = [plane_wave(grid, (5, 0)), plane_wave(grid, (0, 4), 1.0), plane_wave(grid, (2, 6))]
    x = torch.stack([low[0] + low[1] + high[0], low[2] + high[1] + high[2] + 0.7])[None]
    expected = torch.stack([low[0] + low[1], low[2] + 0.7])[None]  # the mean (k = 0) stays
    out = identity_spectral_conv(2, 2, modes)(x)
    assert torch.allclose(out, expected, atol=1e-12)


def test_spectral_conv_identity_in_3d():
    grid = (6, 8, 10)
    kept, dropped = plane_wave(grid, (1, -2, 2), 0.3), plane_wave(grid, (3, 0, 1))
    out = identity_spectral_conv(3, 1, 3)(torch.stack([kept + dropped])[None])
    assert torch.allclose(out[0, 0], kept, atol=1e-12)


def test_spectral_conv_keeps_every_mode_of_a_short_odd_grid():
    x = torch.randn(1, 1, 5, 7, dtype=F64)  # modes=8 exceeds both axes: nothing to drop
    assert torch.allclose(identity_spectral_conv(2, 1, 8)(x), x, atol=1e-12)


def test_spectral_conv_applies_a_complex_weight_analytically():
    # weight a + ib on every mode maps cos(theta) (last-axis wavenumber > 0) to
    # Re((a + ib) e^{i theta}) = a cos(theta) - b sin(theta)
    a, b = 0.7, -1.3
    conv = SpectralConv(2, 1, 1, modes=4).double()
    with torch.no_grad():
        conv.weight[..., 0] = a
        conv.weight[..., 1] = b
    grid = (10, 12)
    for k in [(1, 2), (-2, 3), (0, 1)]:
        out = conv(plane_wave(grid, k)[None, None])[0, 0]
        expected = a * plane_wave(grid, k) - b * plane_wave(grid, k, -math.pi / 2)
        assert torch.allclose(out, expected, atol=1e-12), k


@pytest.mark.parametrize("grid", [(9, 12), (5, 8, 6), (20, 33)])
def test_spectral_conv_equals_the_fft_definition(grid):
    """Random complex weights, mixed channels: the kept-rows DFT products give what rfftn,
    a zero-filled spectrum with the kept modes mixed, and irfftn give."""
    torch.manual_seed(1)
    dims, modes = len(grid), 3
    conv = SpectralConv(dims, 2, 3, modes).double()
    x = torch.randn(2, 2, *grid, dtype=F64)
    axes = tuple(range(2, 2 + dims))
    spectrum = torch.fft.rfftn(x, dim=axes)
    out = torch.zeros(2, 3, *spectrum.shape[2:], dtype=spectrum.dtype)
    weight = torch.view_as_complex(conv.weight)
    wavenumbers = [range(-(modes - 1), modes)] * (dims - 1) + [range(modes)]
    for k in itertools.product(*wavenumbers):
        at = tuple(ki % n for ki, n in zip(k, grid[:-1], strict=False)) + (k[-1],)
        w = weight[(slice(None), slice(None), *(ki % (2 * modes - 1) for ki in k[:-1]), k[-1])]
        out[(slice(None), slice(None), *at)] = spectrum[(slice(None), slice(None), *at)] @ w
    expected = torch.fft.irfftn(out, s=grid, dim=axes)
    assert torch.allclose(conv(x), expected, atol=1e-12)


def test_fno_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dims"):
        FNO(4, 1, 1)
    with pytest.raises(ValueError, match="width"):
        FNO(2, 1, 1, width=0)
    with pytest.raises(ValueError, match="padding"):
        FNO(2, 1, 1, padding=(1, 2, 3))
    with pytest.raises(ValueError, match="x must be"):
        FNO(2, 3, 1, width=4, modes=2, layers=1)(torch.zeros(1, 2, 5, 5))


def test_networks_build_their_input_from_the_constraint():
    c = DiffusionSorptionConstraint()
    grids = ds_grids(9, 12)
    initial = torch.rand(2, 12)
    net = BasisNetwork.for_constraint(c, num_basis=5, width=6, modes=3, layers=2)
    assert net.fno.padding == (6, 6)  # both DS axes are non-periodic
    basis = net(initial, grids)
    assert basis.shape == (2, 5, 9, 12)
    assert torch.equal(basis, net(c.inputs(initial, grids)))  # same as the prepared input
    sc = SoftConstrained.for_constraint(c, width=6, modes=3, layers=2)
    assert sc(initial, grids).shape == (2, 9, 12)
    ns_net = BasisNetwork.for_constraint(NavierStokesConstraint(), 4, width=4, modes=2, layers=1)
    assert ns_net.fno.padding == (6, 0, 0)  # only time is non-periodic
    with pytest.raises(ValueError, match="grids given"):
        BasisNetwork(2, 3, 5, width=4, modes=2, layers=1)(initial, grids)


# ---------------------------------------------------------------------------
# Stencils
# ---------------------------------------------------------------------------


def test_finite_difference_stencils_are_second_order_everywhere():
    errors = {"d1": [], "d1_ends": [], "d2": [], "d2_ends": []}
    for n in (33, 65, 129, 257):
        t = torch.linspace(0.0, 1.0, n, dtype=F64)
        h = 1.0 / (n - 1)
        f = torch.sin(3 * t) * torch.exp(t)  # (n,)
        df = (3 * torch.cos(3 * t) + torch.sin(3 * t)) * torch.exp(t)
        d2f = (6 * torch.cos(3 * t) - 8 * torch.sin(3 * t)) * torch.exp(t)
        field = torch.stack([f, 2 * f])[:, None, :]  # (2, 1, n): leading dims pass through
        e1 = (first_derivative(field, h, axis=-1)[0, 0] - df).abs()
        e2 = (second_derivative(field, h, axis=2)[1, 0] / 2 - d2f).abs()
        errors["d1"].append(float(e1[1:-1].max()))
        errors["d1_ends"].append(float(e1[[0, -1]].max()))
        errors["d2"].append(float(e2[1:-1].max()))
        errors["d2_ends"].append(float(e2[[0, -1]].max()))
    for name, errs in errors.items():
        orders = observed_order(errs)
        assert all(1.8 < p < 2.3 for p in orders), (name, orders)  # measured 1.87 to 2.0


def test_boundary_traces_converge_at_their_order():
    value_left, value_right, slope_right = [], [], []
    for nx in (16, 32, 64, 128):
        x = (np.arange(nx) + 0.5) / nx  # cell centres: the faces are half a cell away
        f = torch.tensor(np.exp(x) * np.sin(2 * x) + 0.3)
        value_left.append(abs(float(trace(f, lagrange_weights(x[:3], 0.0), 0, 0)) - 0.3))
        right = float(trace(f, lagrange_weights(x[-3:], 1.0), nx - 3, 0))
        value_right.append(abs(right - (math.e * math.sin(2) + 0.3)))
        slope = float(trace(f, lagrange_weights(x[-3:], 1.0, derivative=1), nx - 3, 0))
        slope_right.append(abs(slope - math.e * (math.sin(2) + 2 * math.cos(2))))
    assert all(p > 2.8 for p in observed_order(value_left))  # measured 3.4, 3.2, 3.1
    assert all(p > 2.8 for p in observed_order(value_right))  # measured 3.0
    assert all(1.8 < p < 2.3 for p in observed_order(slope_right))  # measured 2.0


# ---------------------------------------------------------------------------
# Diffusion-sorption
# ---------------------------------------------------------------------------


def outflow_wavenumber() -> float:
    """k with sin(k) + D k cos(k) = 0: sin(k x) then satisfies u(1) = -D u_x(1)."""
    return brentq(lambda k: math.sin(k) + D * k * math.cos(k), 2.0, 3.5)


def ds_exact(t: np.ndarray, x: np.ndarray, amplitude: float = 0.5) -> np.ndarray:
    """An exact solution of u_t = D u_xx (R = 1) with u(0, t) = 1 and u(1) = -D u_x(1):
    u = 1 - x / (1 + D) + A exp(-D k^2 t) sin(k x)."""
    k = outflow_wavenumber()
    return 1.0 - x / (1.0 + D) + amplitude * np.exp(-D * k * k * t) * np.sin(k * x)


def test_ds_exact_solution_has_zero_residual_and_loss_to_second_order():
    c = DiffusionSorptionConstraint(bulk_density=0.0)  # R = 1
    residuals, losses = [], []
    for nt, nx in ((21, 16), (41, 32), (81, 64), (161, 128)):
        grids = ds_grids(nt, nx)
        t, x = grids["t"].numpy()[:, None], grids["x"].numpy()[None, :]
        u = torch.tensor(np.stack([ds_exact(t, x), ds_exact(t, x, -0.3)]))  # (2, nt, nx)
        residuals.append(float(c.residual_field(u, grids).abs().max()))
        losses.append(float(c.physics_loss(u, u[:, 0], grids)))
    assert residuals[-1] < 2e-4 and losses[-1] < 1e-4  # measured 1.1e-4 and 3.7e-5
    assert all(1.8 < p < 3.2 for p in observed_order(residuals)), residuals  # 3.0, 2.1, 2.0
    assert all(1.8 < p < 2.8 for p in observed_order(losses)), losses  # 2.5, 2.2, 2.1


def test_ds_nonlinear_residual_matches_the_analytic_one():
    # any smooth field (not a solution): R(u) u_tau - T D u_xx from the analytic
    # derivatives, with R from the data generator's own implementation (which applies
    # the same max(u, 1e-6) guard; the field dips below zero near x = 1)
    c, simulator = DiffusionSorptionConstraint(), DiffusionSorption()
    errors = []
    for nt, nx in ((21, 16), (41, 32), (81, 64)):
        grids = ds_grids(nt, nx)
        tau, x = grids["t"].numpy()[:, None] / 500.0, grids["x"].numpy()[None, :]
        wave = 0.3 * np.sin(np.pi * x) * np.exp(-tau)
        u = wave + 0.05 - 0.1 * x
        exact = simulator.retardation(u) * (-wave) - 500.0 * D * (-(np.pi**2) * wave)
        residual = c.residual_field(torch.tensor(u)[None], grids)[0].numpy()
        errors.append(float(np.abs(residual - exact).max()))
    assert errors[-1] < 5e-4  # measured 1.7e-4 against residuals of size 0.48
    assert all(p > 1.8 for p in observed_order(errors)), errors  # measured 3.0, 2.6


def random_basis(batch: int, n: int, grid: tuple[int, ...], seed: int) -> torch.Tensor:
    """Smooth-ish positive random basis functions (B, N, *grid), float64."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, n, *(max(2, s // 3) for s in grid), generator=gen, dtype=F64)
    mode = "bilinear" if len(grid) == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=grid, mode=mode, align_corners=True)


@pytest.mark.parametrize("whole", [True, False])
@pytest.mark.parametrize("splits", [(1, 1), (1, 4), (2, 3)])
def test_ds_expert_residual_equals_the_full_grid_residual(splits, whole):
    c = DiffusionSorptionConstraint(global_conditions=whole)
    nt, nx, batch, n = 11, 13, 2, 5
    grids = ds_grids(nt, nx)
    basis = random_basis(batch, n, (nt, nx), seed=1)
    omega = torch.rand(batch, n, dtype=F64) / n
    initial = torch.rand(batch, nx, dtype=F64) * 0.2
    u = torch.einsum("bnij,bn->bij", basis, omega)  # (B, nt, nx)
    full = c.residual_field(u, grids).reshape(batch, -1)
    traces = c.derivatives(u[:, None], grids)
    partition = Partition((nt, nx), splits)
    derivs = c.derivatives(basis, grids)
    gen = torch.Generator().manual_seed(0)
    for k in range(partition.num_experts):
        points = partition.sample(k, 7, gen)
        params = c.expert_params(derivs, initial, partition, k, points, grids)
        assert all(p.shape[0] == batch and not p.requires_grad for p in params)
        r = torch.vmap(c.residual_fn)(omega, params)  # (B, M)
        m = points.numel()
        # Rows in the settling levels (time derivative reaching t = 0) are zeroed.
        settled = (points // nx >= c.settling_levels).to(F64)
        assert torch.allclose(r[:, :m], full[:, points] * settled, rtol=1e-12, atol=1e-12)
        assert torch.allclose(r[:, -n:], c.ridge * omega)
        # the linear rows, rebuilt from u itself: every expert the whole initial condition
        # and both whole boundaries (global_conditions), or the parts in its block
        st, sx = (slice(0, nt), slice(0, nx)) if whole else partition.slices(k)
        expected = []
        if st.start == 0:
            expected.append(u[:, 0, sx] - initial[:, sx])
        times = slice(max(st.start, 1), st.stop)
        if sx.start == 0:
            expected.append(traces["u_left"][:, 0, times] - 1.0)
        if sx.stop == nx:
            expected.append(traces["u_right"][:, 0, times] + D * traces["ux_right"][:, 0, times])
        lin = torch.cat(expected, 1) if expected else torch.zeros(batch, 0, dtype=F64)
        # balance_rows: each group weighted by sqrt(PDE rows that count / its rows); pooled
        # (balance_each_group off), all by sqrt(PDE rows that count / linear rows)
        each = [(settled.sum() / g.shape[1]).sqrt() * g for g in expected]
        weighted = torch.cat(each, 1) if each else lin
        assert torch.allclose(r[:, m:-n], weighted, rtol=1e-12, atol=1e-12)
        # the weight column, by which the initial guess reads the targets' level
        unweighted = replace(c, balance_rows=False)
        plain = unweighted.expert_params(derivs, initial, partition, k, points, grids)[4]
        if plain.shape[1]:
            level = params[4].abs().mean(1) / params[5][:, -1]
            assert torch.allclose(level, plain.abs().mean(1), rtol=1e-12)
        pooled = replace(c, balance_each_group=False)
        params = pooled.expert_params(derivs, initial, partition, k, points, grids)
        r = torch.vmap(c.residual_fn)(omega, params)
        weight = (settled.sum() / lin.shape[1]).sqrt() if lin.shape[1] else 1.0
        assert torch.allclose(r[:, m:-n], weight * lin, rtol=1e-12, atol=1e-12)
        params = unweighted.expert_params(derivs, initial, partition, k, points, grids)
        r = torch.vmap(c.residual_fn)(omega, params)
        assert torch.allclose(r[:, m:-n], lin, rtol=1e-12, atol=1e-12)


def test_ds_expert_rows_accept_per_sample_points():
    c = DiffusionSorptionConstraint()
    grids = ds_grids(9, 10)
    basis = random_basis(2, 3, (9, 10), seed=2)
    partition = Partition((9, 10), (1, 2))
    derivs = c.derivatives(basis, grids)
    initial = torch.zeros(2, 10, dtype=F64)
    points = torch.stack([partition.sample(1, 4, torch.Generator().manual_seed(s)) for s in (0, 1)])
    both = c.expert_params(derivs, initial, partition, 1, points)
    for b in range(2):
        one = c.expert_params(derivs, initial, partition, 1, points[b])
        assert all(torch.equal(x[b], y[b]) for x, y in zip(both, one, strict=True))


def test_ds_inputs_and_argument_checks():
    c = DiffusionSorptionConstraint()
    grids = ds_grids(5, 8)
    initial = torch.rand(3, 8, dtype=F64)
    x = c.inputs(initial, grids)
    assert x.shape == (3, 3, 5, 8)
    assert torch.equal(x[:, 0, :, 0], grids["t"].expand(3, 5) / 500.0)
    assert torch.equal(x[:, 1, 2], grids["x"].expand(3, 8))
    assert torch.equal(x[:, 2, 4], initial)
    with pytest.raises(ValueError, match="initial"):
        c.inputs(torch.zeros(3, 7), grids)
    with pytest.raises(ValueError, match=r"grids\['t'\]"):
        c.derivatives(torch.zeros(1, 1, 5, 8), {**grids, "t": torch.tensor([0, 1, 3, 4, 5.0])})
    with pytest.raises(ValueError, match="porosity"):
        DiffusionSorptionConstraint(porosity=0.0)
    with pytest.raises(ValueError, match="ridge"):
        DiffusionSorptionConstraint(ridge=-1.0)


# ---------------------------------------------------------------------------
# Navier-Stokes
# ---------------------------------------------------------------------------


def shell_field(n: int) -> np.ndarray:
    """A vorticity on the single shell |k|^2 = 5 (a Laplacian eigenfunction): (n, n)."""
    x = np.arange(n) / n
    X, Y = np.meshgrid(x, x, indexing="ij")
    return (
        np.cos(2 * np.pi * (X + 2 * Y))
        + 0.5 * np.sin(2 * np.pi * (2 * X - Y))
        + 0.3 * np.cos(2 * np.pi * (2 * X + Y))
    )


def test_ns_single_shell_decay_has_zero_residual_to_second_order():
    # w = shell(x, y) exp(-nu 4 pi^2 5 t) is exact: u . grad w = 0 on a single shell
    nu, t_end, n = 1e-2, 2.0, 16  # nu large enough for the decay to be resolved
    c = NavierStokesConstraint(viscosity=nu, t_end=t_end)
    decay = nu * 4 * np.pi**2 * 5
    residuals = []
    for nt in (11, 21, 41, 81):
        grids = ns_grids(nt, n, t_end)
        w = torch.tensor(np.exp(-decay * grids["t"].numpy())[:, None, None] * shell_field(n))
        d = c.derivatives(w[None, None], grids)
        assert float((d["u"] * d["w_x"] + d["v"] * d["w_y"]).abs().max()) < 1e-12
        residuals.append(float(c.residual_field(w[None], grids).abs().max()))
        if nt == 81:
            assert float(c.physics_loss(w[None], w[None, 0], grids)) < 5e-4  # measured 2.7e-4
    assert residuals[-1] < 5e-3  # measured 2.7e-3 (one-sided ends), against |w_t| ~ 2
    assert all(1.7 < p < 2.2 for p in observed_order(residuals)), residuals  # 1.8, 1.9, 1.95


def test_ns_velocity_matches_the_analytic_and_the_simulator():
    n = 16
    c = NavierStokesConstraint()
    grids = ns_grids(3, n, 1.0)
    # the shell: psi = w / (4 pi^2 5), u = psi_y, v = -psi_x
    x = np.arange(n) / n
    X, Y = np.meshgrid(x, x, indexing="ij")
    theta = [2 * np.pi * (X + 2 * Y), 2 * np.pi * (2 * X - Y), 2 * np.pi * (2 * X + Y)]
    psi_y = (-np.sin(theta[0]) * 2 * 2 * np.pi + 0.5 * np.cos(theta[1]) * (-1) * 2 * np.pi
             + 0.3 * (-np.sin(theta[2])) * 2 * np.pi) / (4 * np.pi**2 * 5)  # fmt: skip
    psi_x = (-np.sin(theta[0]) * 2 * np.pi + 0.5 * np.cos(theta[1]) * 2 * 2 * np.pi
             + 0.3 * (-np.sin(theta[2])) * 2 * 2 * np.pi) / (4 * np.pi**2 * 5)  # fmt: skip
    w = torch.tensor(shell_field(n)).expand(3, n, n)
    d = c.derivatives(w[None, None], grids)
    assert np.abs(d["u"][0, 0, 1].numpy() - psi_y).max() < 1e-14
    assert np.abs(d["v"][0, 0, 1].numpy() + psi_x).max() < 1e-14
    # a random field against the numpy simulator's velocity
    w0 = gaussian_random_field(np.random.default_rng(0), 32)
    u_ref, v_ref = ns_simulator.velocity(w0)
    d = c.derivatives(torch.tensor(w0).expand(1, 1, 3, 32, 32), ns_grids(3, 32, 1.0))
    assert np.abs(d["u"][0, 0, 2].numpy() - u_ref).max() < 1e-14
    assert np.abs(d["v"][0, 0, 2].numpy() - v_ref).max() < 1e-14


def test_ns_advection_and_laplacian_match_the_analytic_terms():
    # w = sin(2 pi x) + cos(4 pi y): psi = sin(2 pi x) / 4 pi^2 + cos(4 pi y) / 16 pi^2,
    # u w_x + v w_y = 1.5 cos(2 pi x) sin(4 pi y); steady in t, so r = that - nu lap(w)
    n, nu = 16, 0.01
    c = NavierStokesConstraint(viscosity=nu)
    x = np.arange(n) / n
    X, Y = np.meshgrid(x, x, indexing="ij")
    w = np.sin(2 * np.pi * X) + np.cos(4 * np.pi * Y)
    lap = -4 * np.pi**2 * np.sin(2 * np.pi * X) - 16 * np.pi**2 * np.cos(4 * np.pi * Y)
    exact = 1.5 * np.cos(2 * np.pi * X) * np.sin(4 * np.pi * Y) - nu * lap
    r = c.residual_field(torch.tensor(w).expand(1, 4, n, n), ns_grids(4, n, 1.0))
    assert np.abs(r[0].numpy() - exact).max() < 1e-11


@pytest.mark.parametrize("splits", [(1, 1, 1), (1, 2, 2), (2, 1, 3)])
def test_ns_expert_residual_equals_the_full_grid_residual(splits):
    c = NavierStokesConstraint(viscosity=1e-3)
    nt, n, batch, nb = 6, 8, 2, 4
    grids = ns_grids(nt, n, 1.0)
    basis = random_basis(batch, nb, (nt, n, n), seed=3)
    omega = torch.randn(batch, nb, dtype=F64)
    initial = torch.randn(batch, n, n, dtype=F64)
    w = torch.einsum("bnijk,bn->bijk", basis, omega)
    full = c.residual_field(w, grids).reshape(batch, -1)
    partition = Partition((nt, n, n), splits)
    derivs = c.derivatives(basis, grids)
    for k in range(partition.num_experts):
        points = partition.sample(k, 9, torch.Generator().manual_seed(k))
        params = c.expert_params(derivs, initial, partition, k, points, grids)
        r = torch.vmap(c.residual_fn)(omega, params)
        m = points.numel()
        assert torch.allclose(r[:, :m], full[:, points], rtol=1e-12, atol=1e-12)
        st, sx, sy = partition.slices(k)
        ic = (w[:, 0, sx, sy] - initial[:, sx, sy]).reshape(batch, -1)
        if st.start != 0:
            ic = ic[:, :0]
        assert torch.allclose(r[:, m:-nb], ic, rtol=1e-12, atol=1e-12)
        assert torch.allclose(r[:, -nb:], c.ridge * omega)


# ---------------------------------------------------------------------------
# The residual functions under torch.func
# ---------------------------------------------------------------------------


def ds_problem(k: int):
    c = DiffusionSorptionConstraint(global_conditions=k != 4)
    grids = ds_grids(9, 12)
    basis = random_basis(3, 4, (9, 12), seed=4)
    partition = Partition((9, 12), (3, 3))  # expert 4 of its own block: no linear rows
    params = c.expert_params(
        c.derivatives(basis, grids), torch.rand(3, 12, dtype=F64) * 0.2, partition, k,
        partition.sample(k, 6, torch.Generator().manual_seed(0)), grids,
    )  # fmt: skip
    return c.residual_fn, params, torch.rand(3, 4, dtype=F64) * 0.5 + 0.1


def ns_problem(k: int):
    c = NavierStokesConstraint()
    grids = ns_grids(5, 8, 1.0)
    basis = random_basis(3, 4, (5, 8, 8), seed=5)
    partition = Partition((5, 8, 8), (2, 2, 1))
    params = c.expert_params(
        c.derivatives(basis, grids), torch.randn(3, 8, 8, dtype=F64), partition, k,
        partition.sample(k, 6, torch.Generator().manual_seed(0)), grids,
    )  # fmt: skip
    return c.residual_fn, params, torch.randn(3, 4, dtype=F64)


@pytest.mark.parametrize(
    "problem, k",
    [(ds_problem, 0), (ds_problem, 4), (ds_problem, 8), (ns_problem, 0), (ns_problem, 3)],
)
def test_residual_fn_under_vmap_and_jacfwd_matches_finite_differences(problem, k):
    fn, params, omega = problem(k)
    residuals = torch.func.vmap(fn)(omega, params)
    for p in range(omega.shape[0]):  # vmap == a loop over the problems
        one = fn(omega[p], tuple(x[p] for x in params))
        assert torch.allclose(residuals[p], one, rtol=0, atol=1e-14)
    jac = torch.func.vmap(torch.func.jacfwd(fn))(omega, params)
    n_problems, n_basis = omega.shape
    assert jac.shape == (n_problems, residuals.shape[1], n_basis)
    h = 1e-6
    for j in range(n_basis):
        step = torch.zeros_like(omega)
        step[:, j] = h
        fd = (torch.vmap(fn)(omega + step, params) - torch.vmap(fn)(omega - step, params)) / (2 * h)
        assert torch.allclose(jac[:, :, j], fd, rtol=1e-6, atol=1e-7), j
    # reverse mode as well (the implicit backward uses vjp)
    _, pull = torch.func.vjp(lambda w: torch.func.vmap(fn)(w, params), omega)
    (grad,) = pull(torch.ones_like(residuals))
    assert torch.allclose(grad, jac.sum(1), rtol=1e-12, atol=1e-12)


def test_residual_functions_and_constraints_pickle_by_reference():
    for obj in (diffusion_sorption_residual, navier_stokes_residual):
        assert pickle.loads(pickle.dumps(obj)) is obj
    c = DiffusionSorptionConstraint(ridge=1e-3)
    again = pickle.loads(pickle.dumps(c))
    assert again == c and again.residual_fn is diffusion_sorption_residual


# ---------------------------------------------------------------------------
# constraint_for, assemble
# ---------------------------------------------------------------------------


def test_constraint_for_maps_manifest_parameters():
    ds = constraint_for(
        "diffusion-sorption",
        {"t_end": 250, "diffusivity": 1e-3, "initial_low": 0.0, "initial_condition": "constant"},
    )
    assert isinstance(ds, DiffusionSorptionConstraint) and ds.t_end == 250.0
    assert ds.diffusivity == 1e-3 and ds.name == "diffusion-sorption" and ds.field == "u"
    assert ds.balance_rows is True  # the default; a switch stays a bool, not 0.0 / 1.0
    assert constraint_for("diffusion-sorption", {"balance_rows": False}).balance_rows is False
    ns = constraint_for("navier-stokes", {"viscosity": 1e-3, "grf_alpha": 2.5, "t_end": 50})
    assert isinstance(ns, NavierStokesConstraint) and ns.field == "vorticity"
    assert constraint_for("navier-stokes", {}) == NavierStokesConstraint()
    with pytest.raises(ValueError, match="pde_name.*'burgers'"):
        constraint_for("burgers", {})
    with pytest.raises(ValueError, match="'reynolds'"):
        constraint_for("navier-stokes", {"reynolds": 1e4})
    with pytest.raises(ValueError, match="'viscosity'"):
        constraint_for("navier-stokes", {"viscosity": "thick"})


def test_assemble_uses_each_experts_omega_on_its_subdomain():
    partition = Partition((6, 7), (2, 3))
    basis = torch.randn(2, 4, 6, 7, dtype=F64, requires_grad=True)
    omegas = [torch.randn(2, 4, dtype=F64, requires_grad=True) for _ in range(6)]
    u = assemble(basis, omegas, partition)
    assert u.shape == (2, 6, 7)
    for k, omega in enumerate(omegas):
        mask = partition.mask(k)
        direct = torch.einsum("bnij,bn->bij", basis, omega)
        assert torch.allclose(u[:, mask], direct[:, mask], rtol=0, atol=1e-14)
    inputs = (basis, *omegas)
    assert torch.autograd.gradcheck(lambda b, *w: assemble(b, list(w), partition), inputs)
    with pytest.raises(ValueError, match="omegas"):
        assemble(basis, omegas[:5], partition)


def test_partition_interfaces_pair_neighbouring_blocks():
    partition = Partition((6, 8), (2, 2))  # experts 0 1 / 2 3, C order over (t, x)
    assert partition.interfaces(1) == [(0, 1), (2, 3)]  # across x
    assert partition.interfaces(0) == [(0, 2), (1, 3)]  # across t
    assert Partition((6, 8), (1, 4)).interfaces(1) == [(0, 1), (1, 2), (2, 3)]
    assert Partition((6, 8), (1, 1)).interfaces(1) == []


def test_interface_jumps_are_the_sides_differences_at_the_faces():
    """Basis functions quadratic in t and x: three-point extrapolation is exact, so with
    one omega everywhere the jumps vanish, and with omega_1 = 3 omega_0 the value jump at
    the x face is u(face) - 3 u(face) and the flux jump T D (u_x - 3 u_x), analytically."""
    nt, nx = 9, 12
    grids = ds_grids(nt, nx)
    c = DiffusionSorptionConstraint()
    tau = grids["t"] / c.t_end
    x = grids["x"]
    shapes = [torch.ones(nt, nx), x[None, :] ** 2 + 0 * tau[:, None], tau[:, None] * x[None, :]]
    basis = torch.stack(shapes)[None].to(F64)  # (1, 3, nt, nx)
    omega = torch.tensor([[0.3, -1.2, 0.7]], dtype=F64)
    partition = Partition((nt, nx), (1, 2))

    def u_and_slope(at_x: float):
        value = 0.3 - 1.2 * at_x**2 + 0.7 * tau * at_x
        return value, -2.4 * at_x + 0.7 * tau

    jumps = c.interface_jumps(basis, [omega, omega], partition, grids)
    assert jumps.shape == (1, 2 * nt) and jumps.abs().max() < 1e-12
    jumps = c.interface_jumps(basis, [omega, 3 * omega], partition, grids).reshape(nt, 2)
    value, slope = u_and_slope(0.5)  # the face between cells 5 and 6 of 12
    flux = c.t_end * c.diffusivity * slope
    assert torch.allclose(jumps[:, 0], value - 3 * value, atol=1e-12)
    assert torch.allclose(jumps[:, 1], flux - 3 * flux, atol=1e-12)
    # across t: value jumps only, halfway between levels 4 and 5 (blocks of 5 and 4 levels)
    by_time = c.interface_jumps(basis, [omega, 3 * omega], Partition((nt, nx), (2, 1)), grids)
    face = (tau[4] + tau[5]) / 2
    value = 0.3 - 1.2 * x**2 + 0.7 * face * x
    assert torch.allclose(by_time[0], value - 3 * value, atol=1e-12)


def test_ds_assembled_fields_take_the_omegas_as_assemble_does():
    """Ray experts answer through the host: the omegas may come on another device or in
    another dtype than the basis, and every field (the assembled ones, the boundary traces,
    the interface jumps) takes them on the basis' device and dtype."""
    nt, nx = 6, 16
    grids = ds_grids(nt, nx)
    c = DiffusionSorptionConstraint()
    partition = Partition((nt, nx), (1, 4))
    derivs = c.derivatives(random_basis(2, 3, (nt, nx), seed=1), grids)
    omegas = [torch.randn(2, 3, dtype=F64) for _ in range(4)]
    other = [w.float() for w in omegas]  # what a float32 answer would be
    want = c.assembled_fields(derivs, [w.float().double() for w in omegas], partition, grids)
    got = c.assembled_fields(derivs, other, partition, grids)
    assert set(got) == set(want) and "jumps" in got
    for key, value in want.items():
        assert got[key].dtype == F64
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# In-process expert solves (needs actors.constraint)
# ---------------------------------------------------------------------------


def test_expert_problems_shapes():
    c = DiffusionSorptionConstraint()
    grids = ds_grids(9, 12)
    partition = Partition((9, 12), (1, 4))
    problems = expert_problems(
        c, random_basis(2, 3, (9, 12), 6), torch.zeros(2, 12, dtype=F64), grids, partition, 5
    )
    assert len(problems) == 4 and all(p[0].shape == (2, 5, 3) for p in problems)


def test_gather_blocks_rows_and_their_gradient_match_gather_rows_per_block():
    field = torch.randn(2, 3, 5, 6, dtype=F64, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    shared = torch.randperm(30, generator=g)[:7].sort().values
    per_sample = torch.stack([torch.randperm(30, generator=g)[:4] for _ in range(2)])
    unused = torch.tensor([0, 29])
    blocks = gather_blocks(field, [shared, per_sample, unused])
    alone = [gather_rows(field, p) for p in (shared, per_sample, unused)]
    assert all(a.is_contiguous() and torch.equal(a, b) for a, b in zip(blocks, alone, strict=True))
    assert [tuple(b.shape) for b in blocks] == [(2, 7, 3), (2, 4, 3), (2, 2, 3)]
    # the third block takes no part: its gradient is None, nothing scatters from it
    weights = [torch.randn_like(b) for b in blocks[:2]]
    used, used_alone = blocks[:2], alone[:2]
    (grad,) = torch.autograd.grad(
        sum((b * w).sum() for b, w in zip(used, weights, strict=True)), field
    )
    (truth,) = torch.autograd.grad(
        sum((b * w).sum() for b, w in zip(used_alone, weights, strict=True)), field
    )
    assert torch.allclose(grad, truth, rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(
        lambda f: tuple(gather_blocks(f, [shared, per_sample])), (field,)
    )


@pytest.mark.parametrize("m", [7, 10**6])  # 7 per expert; every point of each block
@pytest.mark.parametrize("pde", ["ds", "ns"])
def test_expert_problems_gather_what_each_expert_would_gather_alone(pde, m):
    if pde == "ds":
        c, grids, grid = DiffusionSorptionConstraint(), ds_grids(9, 12), (9, 12)
        splits = (1, 4) if m == 7 else (1, 5)  # blocks of 3, 3, 2, 2, 2 columns
        initial = torch.rand(2, 12, dtype=F64)
    else:
        c, grids, grid = NavierStokesConstraint(), ns_grids(4, 8, 1.0), (4, 8, 8)
        splits = (2, 2, 1) if m == 7 else (3, 2, 1)  # blocks of 2, 1, 1 time levels
        initial = torch.randn(2, 8, 8, dtype=F64)
    basis = random_basis(2, 3, grid, 8).requires_grad_()
    partition = Partition(grid, splits)
    problems = expert_problems(
        c, basis, initial, grids, partition, m, torch.Generator().manual_seed(1)
    )
    derivs = c.derivatives(basis, grids)
    gen = torch.Generator().manual_seed(1)
    first = getattr(c, "settling_levels", 0)
    points = [partition.sample(k, m, gen, first) for k in range(partition.num_experts)]
    assert all(bool((p >= first * grid[-1]).all()) for p in points) or pde == "ns"
    # as many points per expert, or every point of blocks of unequal sizes
    assert (len({p.shape[-1] for p in points}) == 1) == (m == 7)
    alone = [c.expert_params(derivs, initial, partition, k, p, grids) for k, p in enumerate(points)]
    for together, single in zip(problems, alone, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(together, single, strict=True))
    # and the same gradient reaches the basis
    weights = [torch.randn_like(t) for p in alone for t in p]

    def pulled(tuples):
        flat = [t for p in tuples for t in p]
        total = sum((t * w).sum() for t, w in zip(flat, weights, strict=True))
        return torch.autograd.grad(total, basis)[0]

    g1, g2 = pulled(problems), pulled(alone)
    assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "splits, basis_kind, tolerance",
    [
        ((1, 1), "components", 1e-3),  # measured 1.6e-4
        ((1, 2), "components", 1e-3),  # measured 2.4e-4
        ((1, 4), "components", 1e-3),  # measured 2.4e-4
        ((1, 8), "components", 1e-3),  # measured 2.5e-4
        ((2, 2), "components", 1e-3),  # measured 2.2e-4
        ((1, 4), "solution", 1e-3),  # measured 1.3e-4
    ],
)
def test_solve_experts_recovers_an_exact_ds_solution(splits, basis_kind, tolerance):
    """R = 1 makes the exact solution known. "components": the basis holds its three
    components 1, x and the decaying mode (scaled per sample), plus two functions it does
    not use. "solution": the basis holds the solution itself plus four unused functions.

    Every expert meets the whole initial condition and both boundaries, so any split
    recovers the solution from its components. With only the rows inside its block (the
    constraint's `global_conditions=False`) an interior block has no boundary rows, and on
    its few cells 1, x and sin(k x) are nearly collinear: the relative error was 1.9e-2 at
    (1, 4) and 0.17 at (1, 8); and a block starting after t = 0 has no initial rows, so the
    decaying mode, which satisfies the PDE and both boundary conditions, was fixed only by
    the ridge.
    """
    constraint_pkg = pytest.importorskip("actors.constraint")
    c = DiffusionSorptionConstraint(bulk_density=0.0)
    nt, nx = 41, 32
    grids = ds_grids(nt, nx)
    t, x = grids["t"].numpy()[:, None], grids["x"].numpy()[None, :]
    tau = t / 500.0
    truth = torch.tensor(np.stack([ds_exact(t, x, 0.5), ds_exact(t, x, -0.3)]))  # (2, nt, nx)
    if basis_kind == "components":
        k = outflow_wavenumber()
        mode = np.exp(-D * k * k * t) * np.sin(k * x)
        parts = [np.ones_like(mode), x + 0 * t, mode, np.cos(3 * x) * tau, x * x + 0 * t]
        one = torch.tensor(np.stack(parts))  # (5, nt, nx)
        basis = torch.stack([one, one * torch.tensor([1, 2, 3, 4, 5.0])[:, None, None]])
    else:
        unused = [np.cos(3 * x) * tau, x * x + 0 * t, np.sin(2 * np.pi * x) * tau**2]
        unused.append(np.exp(-x) * np.cos(np.pi * tau))
        basis = torch.stack([torch.tensor(np.stack([u.numpy(), *unused])) for u in truth])
    u, diagnostics = solve_in_process(
        c, basis, truth[:, 0], grids, Partition((nt, nx), splits), 200,
        torch.Generator().manual_seed(0), constraint_pkg.LMOptions(),
    )  # fmt: skip
    error = torch.linalg.vector_norm(u - truth) / torch.linalg.vector_norm(truth)
    assert float(error) < tolerance, float(error)
    assert len(diagnostics) == partition_size(splits)
    assert all(d["converged_fraction"] == 1.0 for d in diagnostics)


def partition_size(splits: tuple[int, ...]) -> int:
    return int(np.prod(splits))


def test_solve_experts_recovers_an_exact_ns_solution():
    constraint_pkg = pytest.importorskip("actors.constraint")
    # bilinear residual: the shell decay of the NS test, split into its two shells' parts
    # plus a distractor with nonzero advection
    nu, t_end, n, nt = 1e-2, 1.0, 8, 41
    c = NavierStokesConstraint(viscosity=nu, t_end=t_end)
    grids = ns_grids(nt, n, t_end)
    x = np.arange(n) / n
    X, Y = np.meshgrid(x, x, indexing="ij")
    decay = np.exp(-nu * 4 * np.pi**2 * 5 * grids["t"].numpy())[:, None, None]
    parts = [np.cos(2 * np.pi * (X + 2 * Y)), np.sin(2 * np.pi * (2 * X - Y))]
    distractor = np.sin(2 * np.pi * X) * np.cos(2 * np.pi * Y) + 0 * decay
    basis = torch.tensor(np.stack([decay * parts[0], decay * parts[1], distractor]))[None]
    truth = torch.tensor(decay * (parts[0] + 0.5 * parts[1]))[None]
    options = constraint_pkg.LMOptions()
    u, diagnostics = solve_in_process(
        c, basis, truth[:, 0], grids, Partition((nt, n, n), (1, 2, 2)), 150,
        torch.Generator().manual_seed(0), options,
    )  # fmt: skip
    error = torch.linalg.vector_norm(u - truth) / torch.linalg.vector_norm(truth)
    assert float(error) < 1e-3, float(error)
    assert all(d["converged_fraction"] == 1.0 for d in diagnostics)


@pytest.mark.parametrize("pde", ["diffusion-sorption", "navier-stokes"])
def test_solve_experts_gradient_wrt_the_basis_matches_finite_differences(pde):
    """u depends on the basis directly and through each expert's omega (implicit function
    theorem in actors.constraint): the expert rows must stay differentiable."""
    constraint_pkg = pytest.importorskip("actors.constraint")
    if pde == "diffusion-sorption":
        c, grids, shape, splits = DiffusionSorptionConstraint(), ds_grids(7, 6), (7, 6), (1, 2)
        initial = torch.rand(1, 6, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.2
    else:
        c, grids = NavierStokesConstraint(viscosity=1e-2), ns_grids(5, 4, 1.0)
        shape, splits = (5, 4, 4), (1, 2, 1)
        initial = torch.randn(1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    partition = Partition(shape, splits)
    basis = random_basis(1, 3, shape, seed=7).requires_grad_(True)
    weights = torch.randn(1, *shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    options = constraint_pkg.LMOptions(max_iterations=200, tolerance=1e-13)

    def loss(b: torch.Tensor) -> torch.Tensor:  # every point is a collocation point
        u, _ = solve_in_process(c, b, initial, grids, partition, 10**6, None, options)
        return (u * weights).sum()

    loss(basis).backward()
    h = 1e-6
    for index in [(0, 0, 1, 2), (0, 1, 3, 0), (0, 2, 4, 3)]:
        index = index + (1,) * (len(shape) - 2)
        with torch.no_grad():
            plus, minus = basis.detach().clone(), basis.detach().clone()
            plus[index] += h
            minus[index] -= h
            fd = (loss(plus) - loss(minus)) / (2 * h)
        # measured agreement ~1e-8 relative
        assert abs(float(basis.grad[index]) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


def test_expert_params_stay_differentiable_on_the_driver():
    c = DiffusionSorptionConstraint()
    grids = ds_grids(9, 10)
    basis = random_basis(2, 3, (9, 10), seed=8).requires_grad_(True)
    partition = Partition((9, 10), (1, 2))
    params = c.expert_params(
        c.derivatives(basis, grids), torch.zeros(2, 10, dtype=F64), partition, 0,
        partition.sample(0, 5), grids,
    )  # fmt: skip
    assert all(p.requires_grad for p in params[:4])  # rows; targets and constants are data
    sum(p.sum() for p in params[:4]).backward()
    assert basis.grad is not None and basis.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "problem, k", [(ds_problem, 0), (ds_problem, 4), (ds_problem, 8), (ns_problem, 0)]
)
def test_closed_form_jacobian_and_curvature_match_torch_func(problem, k):
    fn, params, omega = problem(k)
    r, blocks = fn.linearize(omega, params)
    jac = torch.cat(blocks, dim=1)
    assert torch.allclose(r, torch.func.vmap(fn)(omega, params), rtol=1e-13, atol=1e-13)
    expected = torch.func.vmap(torch.func.jacfwd(fn))(omega, params)
    assert torch.allclose(jac, expected, rtol=1e-12, atol=1e-12)
    # H = d(J^T r)/d omega = J^T J + curvature, against forward-over-reverse torch.func
    hess = torch.func.vmap(torch.func.jacfwd(lambda w, p: optimality(fn, w, p)))(omega, params)
    closed = jac.mT @ jac + fn.curvature(omega, params, r)
    assert torch.allclose(closed, hess, rtol=1e-10, atol=1e-10)
    assert fn.curvature(omega, params, r).abs().max() > 1e-8  # the term is really there


@pytest.mark.parametrize("problem, k", [(ds_problem, 0), (ns_problem, 0)])
def test_implicit_vjp_closed_form_equals_generic_path(problem, k):
    fn, params, omega = problem(k)
    omega_bar = torch.randn_like(omega)
    closed = implicit_vjp(fn, omega, params, omega_bar)
    generic = implicit_vjp(lambda w, p: fn(w, p), omega, params, omega_bar)  # no closed form
    for a, b in zip(closed[:-1], generic[:-1], strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
        assert a.abs().max() > 0
    # the PDE's constants are not differentiated by the closed form
    assert torch.equal(closed[-1], torch.zeros_like(params[-1]))


def test_ds_initial_guess_is_the_minimiser_when_r_is_constant():
    """Without sorption R = 1 and the residual is linear in omega: the guess (R frozen)
    is then the least-squares solution itself, which LM from zero reaches too, and the
    gradient of the least-squares objective vanishes there."""
    from actors.constraint import LMOptions, levenberg_marquardt

    g = torch.Generator().manual_seed(3)
    nt, nx, n = 8, 12, 5
    grids = ds_grids(nt, nx)
    c = DiffusionSorptionConstraint(bulk_density=0.0)  # sorption 0: R = 1
    basis = torch.randn(2, n, nt, nx, generator=g, dtype=F64).cumsum(-1) / nx
    initial = torch.rand(2, nx, generator=g, dtype=F64) * 0.2
    derivs = c.derivatives(basis, grids)
    partition = Partition((nt, nx), (1, 2))
    for k in range(2):
        params = c.expert_params(derivs, initial, partition, k, partition.sample(k, 10**9, g))
        guess = c.residual_fn.initial_guess(params)
        solved = levenberg_marquardt(
            c.residual_fn, torch.zeros(2, n, dtype=F64), params, LMOptions(tolerance=1e-12)
        )
        assert torch.allclose(guess, solved.omega, atol=1e-7)
        for p in range(2):
            one = tuple(t[p] for t in params)
            assert optimality(c.residual_fn, guess[p], one).abs().max() < 1e-9


def test_models_saved_before_row_weights_load_with_them_off():
    from actors.constraint import LMOptions
    from actors.surrogate import PDESurrogate

    grids = {k: torch.as_tensor(v) for k, v in ds_grids(5, 8).items()}
    model = PDESurrogate(
        "moe", "diffusion-sorption", {"t_end": 500.0}, grids, 3, 4, 2, 1, (1, 2),
        LMOptions(), 10,
    )  # fmt: skip
    now = pickle.loads(pickle.dumps(model)).constraint
    assert now.balance_rows is True and now.balance_each_group is True
    assert now.global_conditions is True
    del model.pde_parameters["global_conditions"]  # saved before the whole conditions
    own = pickle.loads(pickle.dumps(model)).constraint
    assert own.global_conditions is False and own.balance_each_group is True
    del model.pde_parameters["balance_each_group"]  # saved before a weight per group
    pooled = pickle.loads(pickle.dumps(model))
    assert pooled.constraint.balance_rows is True and pooled.constraint.balance_each_group is False
    del model.pde_parameters["balance_rows"]  # as a model saved before the setting
    old = pickle.loads(pickle.dumps(model))
    assert old.constraint.balance_rows is False and old.pde_parameters["balance_rows"] is False


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 3, 4, 5)])  # (B, N, t, x[, y])
def test_unit_rms_backward_matches_autograd_and_finite_differences(shape):
    """The basis normalisation's closed-form backward: against gradcheck (finite
    differences) and against autograd through the plain formula, with one function of one
    sample below the floor (its scale a constant there)."""
    from actors.surrogate import unit_rms

    def plain(basis, floor=1e-6):
        dims = tuple(range(2, basis.dim()))
        return basis / basis.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp_min(floor)

    torch.manual_seed(0)
    basis = torch.randn(shape, dtype=torch.float64)
    basis[1, 2] *= 1e-9  # RMS ~1e-9 < floor
    basis.requires_grad_(True)
    assert torch.equal(unit_rms(basis), plain(basis))
    assert torch.autograd.gradcheck(unit_rms, (basis,))
    weight = torch.randn_like(basis)
    (ours,) = torch.autograd.grad((unit_rms(basis) * weight).sum(), basis)
    (reference,) = torch.autograd.grad((plain(basis) * weight).sum(), basis)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    # the floored function's gradient is the plain division's, 1 / floor per unit
    torch.testing.assert_close(ours[1, 2], weight[1, 2] / 1e-6)


@pytest.mark.parametrize("initial_value", [0.004, 0.1])
def test_ds_interior_experts_solve_a_small_initial_value_with_the_whole_conditions(
    initial_value,
):
    """The data generator's solution from a constant u0, and a basis that holds it plus four
    functions it does not use. An interior expert of a [1, 4] split given only the rows of
    its own block (no boundary, initial values of 0.004) can meet them with u = 0, which
    satisfies the PDE exactly; with the whole initial condition and both boundaries (the
    default, as the paper's code gives diffusion-sorption's experts) each expert's omega
    must also reach the inlet's 1, and every block recovers the solution."""
    constraint_pkg = pytest.importorskip("actors.constraint")
    nt, nx = 21, 64
    grids = ds_grids(nt, nx)
    t, x = grids["t"].numpy(), grids["x"].numpy()[None, :]
    truth = torch.tensor(DiffusionSorption().simulate(np.full(nx, initial_value), t))[None]
    tau = t[:, None] / 500.0
    unused = [np.cos(3 * x) * tau, x * x + 0 * tau, np.sin(2 * np.pi * x) * tau**2]
    unused.append(np.exp(-x) * np.cos(np.pi * tau))
    basis = torch.tensor(np.stack([truth[0].numpy(), *unused]))[None]  # (1, 5, nt, nx)

    def block_errors(whole: bool) -> list[float]:
        c = DiffusionSorptionConstraint(global_conditions=whole)
        u, diagnostics = solve_in_process(
            c, basis, truth[:, 0], grids, Partition((nt, nx), (1, 4)), 10**6,
            torch.Generator().manual_seed(0), constraint_pkg.LMOptions(),
        )  # fmt: skip
        assert all(d["converged_fraction"] == 1.0 for d in diagnostics)
        cut = [slice(k * nx // 4, (k + 1) * nx // 4) for k in range(4)]
        return [float((u - truth)[..., s].norm() / truth[..., s].norm()) for s in cut]

    whole = block_errors(True)
    assert max(whole) < 0.05, whole  # measured 1.4 / 0.35 / 0.13 / 1.5 % (u0 = 0.004)
    if initial_value < 0.01:
        own = block_errors(False)
        assert min(own[1:3]) > 0.5, own  # measured 99 and 94 %: u ~ 0 in both blocks
