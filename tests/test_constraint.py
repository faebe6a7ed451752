"""Hard-constraint solver: a catalogue of problems x checks, float64, against independent truth.

Truth comes from outside the solver: closed forms (lstsq, known minimisers, data made from
known parameters), torch.autograd.gradcheck, back-propagation through the unrolled
iterations, and central finite differences of the solution.
"""

from __future__ import annotations

import math

import pytest
import torch

from actors.constraint import (
    RESULTS,
    LMOptions,
    SolverError,
    implicit_vjp,
    levenberg_marquardt,
    optimality,
    solve,
    solve_unrolled,
)
from actors.constraint.levenberg_marquardt import DampedGaussNewton

# torch's forward-mode AD loads TorchScript decompositions on first use (not our code).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

F64 = torch.float64
TIGHT = LMOptions(max_iterations=200, tolerance=1e-12)


def linear(w, p):
    a, b = p
    return a @ w - b


def rosenbrock(w, p):
    (scale,) = p
    return scale * torch.stack([10 * (w[1] - w[0] ** 2), 1 - w[0]])


def exp_fit(w, p):
    t, y = p
    return w[0] * torch.exp(-w[1] * t) + w[2] - y


def pde_like(w, p):
    """(1 + a (B w)^2) (C w) - d, with ridge rows ridge * w: the shape of a PDE residual."""
    b, c, d, a, ridge = p
    u = b @ w
    return torch.cat([(1 + a * u * u) * (c @ w) - d, ridge * w])


def pde_problem(n_problems, m, n, a=0.5, ridge=0.0, noise=0.0, seed=0):
    """Params (B, C, d, a, ridge) with d made from a known omega*; returns (params, omega*)."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(n_problems, m, n, generator=gen, dtype=F64) / math.sqrt(n)
    c = torch.randn(n_problems, m, n, generator=gen, dtype=F64) / math.sqrt(n)
    omega_star = torch.randn(n_problems, n, generator=gen, dtype=F64)
    a_t = torch.full((n_problems,), float(a), dtype=F64) if not torch.is_tensor(a) else a
    u = torch.einsum("pmn,pn->pm", b, omega_star)
    d = (1 + a_t[:, None] * u * u) * torch.einsum("pmn,pn->pm", c, omega_star)
    d = d + noise * torch.randn(d.shape, generator=gen, dtype=F64)
    ridge_t = torch.full((n_problems,), float(ridge), dtype=F64)
    return (b, c, d, a_t, ridge_t), omega_star


# 1. LM finds known minimisers ------------------------------------------------------------


def test_linear_least_squares_matches_lstsq():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 40, 6, generator=gen, dtype=F64)
    b = torch.randn(4, 40, generator=gen, dtype=F64)
    sol = levenberg_marquardt(linear, torch.zeros(4, 6, dtype=F64), (a, b), TIGHT)
    expected = torch.linalg.lstsq(a, b.unsqueeze(-1)).solution.squeeze(-1)
    assert sol.converged.all() and (sol.result == RESULTS.successful).all()
    torch.testing.assert_close(sol.omega, expected, rtol=0, atol=1e-10)
    residual = torch.linalg.vector_norm(torch.einsum("pmn,pn->pm", a, expected) - b, dim=-1)
    torch.testing.assert_close(sol.residual_norm, residual, rtol=1e-10, atol=0)
    assert sol.omega.dtype == F64


def test_rosenbrock_reaches_one_one():
    omega0 = torch.tensor([[-1.2, 1.0], [0.0, 0.0], [2.0, -1.0]], dtype=F64)
    sol = levenberg_marquardt(rosenbrock, omega0, (torch.ones(3, dtype=F64),), TIGHT)
    assert sol.converged.all()
    torch.testing.assert_close(sol.omega, torch.ones(3, 2, dtype=F64), rtol=0, atol=1e-9)
    assert (sol.residual_norm < 1e-9).all()


def test_exponential_fit_recovers_parameters():
    truth = torch.tensor([[2.5, 1.3, 0.2], [0.7, 0.4, -1.0]], dtype=F64)
    t = torch.linspace(0, 4, 50, dtype=F64).expand(2, 50)
    y = truth[:, :1] * torch.exp(-truth[:, 1:2] * t) + truth[:, 2:]
    omega0 = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]], dtype=F64)
    sol = levenberg_marquardt(exp_fit, omega0, (t, y), TIGHT)
    assert sol.converged.all()
    torch.testing.assert_close(sol.omega, truth, rtol=0, atol=1e-9)


@pytest.mark.parametrize("scaling", ["identity", "diagonal"])
def test_pde_like_problem_recovers_known_solution(scaling):
    params, omega_star = pde_problem(3, 60, 8, a=0.5)
    options = LMOptions(max_iterations=200, tolerance=1e-12, scaling=scaling)
    sol = levenberg_marquardt(pde_like, torch.zeros(3, 8, dtype=F64), params, options)
    assert sol.converged.all(), sol.summary()
    torch.testing.assert_close(sol.omega, omega_star, rtol=0, atol=1e-9)


def test_per_problem_masks_stop_converged_problems():
    # Problem 0 is linear (a = 0, two steps), problem 1 strongly nonlinear.
    params, omega_star = pde_problem(2, 60, 8, a=torch.tensor([0.0, 3.0], dtype=F64))
    sol = levenberg_marquardt(pde_like, torch.zeros(2, 8, dtype=F64), params, TIGHT)
    assert sol.converged.all()
    assert sol.iterations[0] < sol.iterations[1]
    torch.testing.assert_close(sol.omega, omega_star, rtol=0, atol=1e-9)
    # The easy problem alone takes the same steps: the batch did not move it further.
    alone = levenberg_marquardt(
        pde_like, torch.zeros(1, 8, dtype=F64), tuple(p[:1] for p in params), TIGHT
    )
    assert int(alone.iterations[0]) == int(sol.iterations[0])
    torch.testing.assert_close(alone.omega[0], sol.omega[0], rtol=0, atol=1e-14)


def test_running_set_changes_keep_each_problem_its_own_rows():
    # Three problems that stop at three different iterations: the set of running problems
    # (whose rows the solver selects and keeps) changes twice; each must still be solved
    # exactly as it is alone.
    a = torch.tensor([0.0, 2.0, 8.0], dtype=F64)
    params, omega_star = pde_problem(3, 60, 8, a=a, seed=5)
    sol = levenberg_marquardt(pde_like, torch.zeros(3, 8, dtype=F64), params, TIGHT)
    assert sol.converged.all()
    assert len(set(sol.iterations.tolist())) == 3, sol.iterations
    torch.testing.assert_close(sol.omega, omega_star, rtol=0, atol=1e-9)
    for k in range(3):
        alone = levenberg_marquardt(
            pde_like, torch.zeros(1, 8, dtype=F64), tuple(p[k : k + 1] for p in params), TIGHT
        )
        assert int(alone.iterations[0]) == int(sol.iterations[k])
        torch.testing.assert_close(alone.omega[0], sol.omega[k], rtol=0, atol=1e-14)


# 2-4. Implicit gradients against independent truth ----------------------------------------


def small_problem():
    """P=2, N=3, M=6 + ridge rows, residual left at the minimum (so H != J^T J)."""
    params, _ = pde_problem(2, 6, 3, a=0.5, ridge=1e-2, noise=0.05, seed=3)
    return params


def test_optimality_is_gradient_and_vanishes_at_solution():
    params = small_problem()
    sol = levenberg_marquardt(pde_like, torch.zeros(2, 3, dtype=F64), params, TIGHT)
    for p_idx in range(2):
        one = tuple(t[p_idx] for t in params)
        w = sol.omega[p_idx].clone().requires_grad_()
        (expected,) = torch.autograd.grad(0.5 * (pde_like(w, one) ** 2).sum(), w)
        torch.testing.assert_close(optimality(pde_like, w.detach(), one), expected)
        assert expected.abs().max() < 1e-10
        assert pde_like(w.detach(), one).norm() > 1e-3  # a residual is left


def test_gradcheck_through_solve():
    b, c, d, a, ridge = small_problem()
    b, d, a = (t.clone().requires_grad_() for t in (b, d, a))
    omega0 = torch.zeros(2, 3, dtype=F64)

    def fn(b, d, a):
        return solve(pde_like, (b, c, d, a, ridge), omega0, TIGHT)[0]

    # Every entry of d and a; B (36 entries) through random projections (fast mode).
    assert torch.autograd.gradcheck(
        lambda d, a: fn(b.detach(), d, a), (d, a), eps=1e-6, atol=1e-7, rtol=1e-5
    )
    assert torch.autograd.gradcheck(fn, (b, d, a), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_implicit_matches_unrolled_backprop():
    params, _ = pde_problem(3, 50, 6, a=0.5, ridge=1e-3, noise=0.05, seed=5)
    params = tuple(p.clone().requires_grad_() for p in params)
    weights = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=F64)

    omega, sol = solve(pde_like, params, options=TIGHT, n_unknowns=6)
    grads_implicit = torch.autograd.grad((weights * omega).sum(), params)
    assert sol.converged.all() and sol.adjoint == {"singular": 0, "nonfinite": 0}

    omega_u = solve_unrolled(pde_like, params, options=TIGHT, n_unknowns=6)
    grads_unrolled = torch.autograd.grad((weights * omega_u).sum(), params)
    torch.testing.assert_close(omega_u.detach(), omega.detach(), rtol=0, atol=1e-12)
    for gi, gu in zip(grads_implicit, grads_unrolled, strict=True):
        assert (gi - gu).norm() <= 1e-8 * gu.norm()  # measured ~6e-12


def test_implicit_matches_finite_differences_of_solution():
    params, _ = pde_problem(2, 40, 5, a=0.8, ridge=1e-3, noise=0.1, seed=7)
    omega_bar = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    sol = levenberg_marquardt(pde_like, torch.zeros(2, 5, dtype=F64), params, TIGHT)
    grads = implicit_vjp(pde_like, sol.omega, params, omega_bar)
    assert [g.shape for g in grads] == [p.shape for p in params]

    h = 1e-5
    for which, index in [(0, (0, 3, 2)), (1, (1, 10, 4)), (2, (0, 7)), (3, (1,)), (4, (0,))]:
        plus = [p.clone() for p in params]
        minus = [p.clone() for p in params]
        plus[which][index] += h
        minus[which][index] -= h
        w_plus = levenberg_marquardt(pde_like, sol.omega, tuple(plus), TIGHT).omega
        w_minus = levenberg_marquardt(pde_like, sol.omega, tuple(minus), TIGHT).omega
        fd = float(((w_plus - w_minus) / (2 * h) * omega_bar).sum())
        implicit = float(grads[which][index])
        assert abs(implicit - fd) <= 1e-7 * max(1.0, abs(fd)), (which, implicit, fd)


def test_gauss_newton_hessian_alone_would_be_wrong():
    # Guards the second-order term: with a residual left, J^T J alone gives another gradient.
    params = small_problem()
    sol = levenberg_marquardt(pde_like, torch.zeros(2, 3, dtype=F64), params, TIGHT)
    omega_bar = torch.ones(2, 3, dtype=F64)
    exact = implicit_vjp(pde_like, sol.omega, params, omega_bar)[2]
    jac = torch.func.vmap(torch.func.jacfwd(pde_like))(sol.omega, params)
    lam = torch.linalg.solve(jac.mT @ jac, -omega_bar.unsqueeze(-1)).squeeze(-1)
    gn = -(jac[:, :6] @ lam.unsqueeze(-1)).squeeze(-1)  # dg/dd = -J[:6]^T, transposed
    assert (exact - gn).norm() > 1e-4 * exact.norm()


def test_descent_falls_back_to_lu_and_flags_singular_systems():
    # Problem 0 is positive definite (Cholesky), 1 indefinite (Cholesky fails, LU solves
    # it), 2 exactly singular (flagged, zero step).
    normal = torch.stack(
        [torch.diag(torch.tensor(v, dtype=F64)) for v in ([2.0, 4.0], [1.0, -2.0], [1.0, 0.0])]
    )
    grad = torch.tensor([[2.0, 4.0], [1.0, 2.0], [1.0, 1.0]], dtype=F64)
    mu = torch.zeros(3, dtype=F64)
    delta, singular = DampedGaussNewton()(normal, grad, mu, torch.ones(3, 2, dtype=F64))
    assert singular.tolist() == [False, False, True]
    expected = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-15)
    for code in RESULTS.codes():
        assert RESULTS.message(code)
    with pytest.raises(ValueError, match="code"):
        RESULTS.message(7)


# 5. Failure is data ---------------------------------------------------------------------


def test_nan_problem_is_reported_not_hidden():
    params, omega_star = pde_problem(2, 30, 4)
    params = tuple(p.clone() for p in params)
    params[2][1, 5] = float("nan")
    sol = levenberg_marquardt(pde_like, torch.zeros(2, 4, dtype=F64), params, TIGHT)
    assert sol.result.tolist() == [RESULTS.successful, RESULTS.nonfinite]
    assert sol.converged.tolist() == [True, False]
    torch.testing.assert_close(sol.omega[0], omega_star[0], rtol=0, atol=1e-9)
    summary = sol.summary()
    assert summary["nonfinite"] == 1.0 and summary["successful"] == 1.0
    assert summary["converged_fraction"] == 0.5
    assert all(isinstance(v, float) for v in summary.values())
    assert "NaN" in RESULTS.message(RESULTS.nonfinite)

    with pytest.raises(SolverError, match=r"1 of 2 problems failed: 1 nonfinite") as err:
        levenberg_marquardt(pde_like, torch.zeros(2, 4, dtype=F64), params, TIGHT, throw=True)
    assert err.value.solution.result.tolist() == sol.result.tolist()

    # Backward: the NaN problem gets a zero gradient and is counted.
    leaves = tuple(p.clone().requires_grad_() for p in params)
    omega, sol2 = solve(pde_like, leaves, options=TIGHT, n_unknowns=4)
    grads = torch.autograd.grad(omega[0].sum() + omega[1].sum(), leaves[:3])
    assert sol2.adjoint == {"singular": 1, "nonfinite": 1}
    assert all(torch.isfinite(g).all() and (g[1] == 0).all() for g in grads)
    assert all(g[0].abs().sum() > 0 for g in grads)


def test_max_iterations_reached_is_reported():
    omega0 = torch.tensor([[-1.2, 1.0], [1.0, 1.0]], dtype=F64)
    options = LMOptions(max_iterations=3, tolerance=1e-12)
    sol = levenberg_marquardt(rosenbrock, omega0, (torch.ones(2, dtype=F64),), options)
    assert sol.result.tolist() == [RESULTS.max_iterations_reached, RESULTS.successful]
    assert sol.iterations.tolist() == [3, 0]
    assert sol.summary()["max_iterations_reached"] == 1.0
    with pytest.raises(SolverError, match="max_iterations_reached"):
        solve(rosenbrock, (torch.ones(2, dtype=F64),), omega0, options, throw=True)


def test_singular_adjoint_gets_zero_gradient_and_is_counted():
    # omega[1] does not enter the residual: the solve is fine (damping), H is singular.
    def fn(w, p):
        (target,) = p
        return torch.stack([w[0] - target[0], w[0] + target[1], 0 * w[1]])

    target = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64, requires_grad=True)
    omega, sol = solve(fn, (target,), options=TIGHT, n_unknowns=2)
    assert sol.converged.all()
    (grad,) = torch.autograd.grad(omega.sum(), target)
    assert sol.adjoint["singular"] == 2 and (grad == 0).all()


# 6. Bad arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_iterations": 0}, "max_iterations"),
        ({"max_iterations": 2.5}, "max_iterations"),
        ({"tolerance": 0.0}, "tolerance"),
        ({"tolerance": -1e-3}, "tolerance"),
        ({"tolerance": float("nan")}, "tolerance"),
        ({"initial_damping": 0.0}, "initial_damping"),
        ({"min_damping": 1.0, "max_damping": 0.5}, "initial_damping"),
        ({"scaling": "cubic"}, "scaling"),
    ],
)
def test_bad_options_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LMOptions(**kwargs)


def test_bad_inputs_name_the_argument():
    a = torch.randn(3, 5, 2, dtype=F64)
    b = torch.randn(4, 5, dtype=F64)
    omega0 = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"params\[1\]"):
        levenberg_marquardt(linear, omega0, (a, b))
    with pytest.raises(ValueError, match="omega0"):
        levenberg_marquardt(linear, torch.zeros(2, dtype=F64), (a, b[:3]))
    with pytest.raises(ValueError, match=r"params\[0\]"):
        levenberg_marquardt(linear, omega0, (a.float(), b[:3]))
    with pytest.raises(ValueError, match="params"):
        levenberg_marquardt(linear, omega0, a)
    with pytest.raises(ValueError, match="options"):
        levenberg_marquardt(linear, omega0, (a, b[:3]), options={"tolerance": 1e-3})
    with pytest.raises(ValueError, match="n_unknowns"):
        solve(linear, (a, b[:3]))
    with pytest.raises(ValueError, match="residual_fn"):
        levenberg_marquardt(lambda w, p: (p[0] @ w).sum(), omega0, (a, b[:3]))
    with pytest.raises(ValueError, match=r"omega\b"):
        implicit_vjp(linear, torch.zeros(3, dtype=F64), (a, b[:3]), omega0)
    with pytest.raises(ValueError, match="omega_bar"):
        implicit_vjp(linear, omega0, (a, b[:3]), torch.zeros(3, 3, dtype=F64))


def test_float32_stays_float32():
    a = torch.randn(2, 20, 3)
    b = torch.randn(2, 20)
    sol = levenberg_marquardt(linear, torch.zeros(2, 3), (a, b), LMOptions(tolerance=1e-5))
    assert sol.omega.dtype == torch.float32 and sol.converged.all()
