"""Batched Levenberg-Marquardt for the small nonlinear least-squares problems of hard constraints.

A hard-constrained model (Negiar et al. 2023; Chalapathi et al. 2024, PI-HC-MoE) ends in a
layer that, for every problem p (a sample x expert pair), fits N basis coefficients omega to
a residual with thousands of rows:

    omega_p* = argmin_omega 1/2 ||r(omega; theta_p)||^2,     r: R^N -> R^M,  N << M.

With N = 16..64 unknowns the right tool is a dense Gauss-Newton method with damping. This
module solves P such problems at once; every quantity is batched over the leading P dim.

Structure (after optimistix): `LevenbergMarquardt` is an object with `init / step /
terminate`, and ONE driver function, `run_solver`, owns the loop, the per-problem step
counts, the non-finite check and the result codes. The pieces of a step are kept apart:

* the *descent* (`DampedGaussNewton`) solves (J^T J + mu D) delta = -J^T r by Cholesky of
  the damped normal matrix, with an LU fallback for the problems whose Cholesky fails.
  Why normal equations although J^T J squares the condition number: with N <= 64 the N x N
  system is tiny next to the (M, N) Jacobian, and the damping mu D (never below
  `min_damping`, the ridge) keeps it positive definite; float64 leaves ample headroom;
* the *search* (`NielsenDamping`) accepts or rejects a step by the gain ratio
  rho = (actual decrease of f) / (decrease predicted by the quadratic model) and updates
  mu with Nielsen's rule: accept iff rho > 0, then mu *= max(1/3, 1 - (2 rho - 1)^3), nu = 2;
  on reject mu *= nu, nu *= 2. Unlike fixed up/down factors this shrinks mu fast on steps
  the model predicts well and never oscillates between two values. One addition: when
  both the predicted and the actual change of f are below f's floating-point resolution
  (16 eps f), rho is round-off noise; the step is taken, mu is left as it is, and the step
  test below ignores it. Without this
  a problem with a residual left at its minimum cannot push the gradient test below about
  sqrt(eps), since no decrease of f can be verified there.

J comes from the residual's closed form when it has one (`residual.ClosedFormResidual`: the
PDE residuals do, at O(M N) a problem), otherwise from `torch.func.jacfwd` (N forward-mode
tangents, cheaper than M reverse passes), vmapped over problems, together with r in the same
pass; J^T J and J^T r are batched matmuls, so nothing larger than (P, M, N) is materialised.
Only J^T J, J^T r and f = 1/2 ||r||^2 are kept between steps.

Convergence rule (per problem, `tol` = `LMOptions.tolerance`); a problem converges when
either holds:

* gradient: max_j |(J^T r)_j| / (||J_j|| ||r||) <= tol at the current iterate, J_j the j-th
  column of J (0/0 counts as 0). This is MINPACK's `gtol`: the cosine of the angle between
  r and each column of J, dimensionless and invariant to scaling r or omega. It is the test
  for problems whose minimum has a residual left (r orthogonal to range(J)), and it holds
  at once when r = 0;
* step: an *accepted* step (rho > 0) satisfies ||delta||_2 <= tol (||omega||_2 + tol)
  (Nielsen's criterion), taken with mu <= its unit (max diag(J^T J) at omega0 for identity
  scaling, 1 for diagonal scaling: the damping does not dominate the curvature). It is the
  test for zero-residual problems, where r -> 0 but the cosine need not. Rejected steps,
  round-off-neutral steps and heavily damped steps do not count: a step made tiny by a
  large mu after rejections is not mistaken for convergence.

Failure is data: `RESULTS` codes (`solution.py`) per problem (successful, max_iterations_reached,
nonfinite, singular) with messages; a trial point with a non-finite residual or Jacobian is
a rejected step (damping grows), a non-finite current iterate (e.g. NaN in the problem's
tensors) stops the problem as `nonfinite`, a damped system that neither Cholesky nor LU can
solve stops it as `singular`. Converged and failed problems are masked and stop changing
while the others continue; `throw=True` raises `SolverError` instead of returning failures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import jacfwd, vmap

from actors.constraint.residual import normal_terms
from actors.constraint.solution import RESULTS, LMOptions, LMSolution, SolverError

ResidualFn = Callable[[Tensor, tuple[Tensor, ...]], Tensor]

# Changes of f below _RESOLUTION * eps * f are treated as round-off (see `step`).
_RESOLUTION = 16.0


class LMState(NamedTuple):
    omega: Tensor  # (P, N) current iterate
    f: Tensor  # (P,) 1/2 ||r||^2 at omega
    grad: Tensor  # (P, N) J^T r
    normal: Tensor  # (P, N, N) J^T J
    diag: Tensor  # (P, N) damping scale D (ones for identity scaling)
    mu: Tensor  # (P,) damping
    nu: Tensor  # (P,) Nielsen's rejection factor
    scale: Tensor  # (P,) unit of mu: max diag(J^T J) at omega0 (identity scaling) or 1
    small_step: Tensor  # (P,) bool: the last step was accepted and tiny
    singular: Tensor  # (P,) bool: the last damped system could not be solved


def linearize(residual_fn: ResidualFn, omega: Tensor, params: tuple[Tensor, ...]):
    """(r (P, M), J's row blocks): the residual's closed form if it has one
    (`ClosedFormResidual`), else one vmapped jacfwd pass (a single block)."""
    closed_form = getattr(residual_fn, "linearize", None)
    if closed_form is not None:
        return closed_form(omega, params)

    def with_value(w, p):
        r = residual_fn(w, p)
        return r, r

    jac, r = vmap(jacfwd(with_value, has_aux=True))(omega, params)  # (P, M, N), (P, M)
    return r, (jac,)


def evaluate(residual_fn: ResidualFn, omega: Tensor, params: tuple[Tensor, ...]):
    """f = 1/2 ||r||^2 (P,), J^T r (P, N), J^T J (P, N, N) from one linearisation."""
    r, blocks = linearize(residual_fn, omega, params)
    if r.dim() != 2:
        raise ValueError(
            f"residual_fn: must return a 1-D residual (M,) per problem, got shape "
            f"{tuple(r.shape[1:])}"
        )
    f = 0.5 * (r * r).sum(-1)  # (P,)
    grad, normal = normal_terms(r, blocks)  # (P, N), (P, N, N)
    return f, grad, normal


def _all_finite(*tensors: Tensor) -> Tensor:
    ok = None
    for t in tensors:
        t_ok = torch.isfinite(t).reshape(t.shape[0], -1).all(-1)
        ok = t_ok if ok is None else ok & t_ok
    return ok


class DampedGaussNewton:
    """Descent: solve (J^T J + mu D) delta = -J^T r; Cholesky, LU for those where it fails."""

    def __call__(self, normal: Tensor, grad: Tensor, mu: Tensor, diag: Tensor):
        damped = normal + torch.diag_embed(mu.unsqueeze(-1) * diag)  # (P, N, N)
        rhs = -grad.unsqueeze(-1)  # (P, N, 1)
        chol, info = torch.linalg.cholesky_ex(damped)
        failed = (info != 0) | ~_all_finite(chol)  # (P,)
        if not bool(failed.any()):
            return torch.cholesky_solve(rhs, chol).squeeze(-1), failed
        # Cholesky of the failed problems is replaced by that of I (so that garbage in chol
        # cannot reach autograd), their step comes from LU with partial pivoting instead.
        eye = torch.eye(damped.shape[-1], dtype=damped.dtype, device=damped.device)
        safe = torch.where(failed[:, None, None], eye, damped)
        delta = torch.cholesky_solve(rhs, torch.linalg.cholesky(safe)).squeeze(-1)  # (P, N)
        bad = failed.nonzero().squeeze(-1)
        sub = damped.index_select(0, bad)
        sub_ok = _all_finite(sub)
        sub = torch.where(sub_ok[:, None, None], sub, eye)
        lu_delta, lu_info = torch.linalg.solve_ex(sub, rhs.index_select(0, bad))
        lu_delta = lu_delta.squeeze(-1)
        sub_singular = (lu_info != 0) | ~sub_ok | ~_all_finite(lu_delta)
        lu_delta = torch.where(sub_singular[:, None], torch.zeros_like(lu_delta), lu_delta)
        delta = delta.index_copy(0, bad, lu_delta)
        singular = torch.zeros_like(failed).index_copy(0, bad, sub_singular)
        return delta, singular


class NielsenDamping:
    """Search: accept iff the gain ratio rho > 0; Nielsen's update of mu and nu."""

    def init(self, scale: Tensor, options: LMOptions):
        mu = options.initial_damping * scale
        nu = torch.full_like(scale, 2.0)
        return mu, nu

    def update(self, mu, nu, rho, accept, active, scale, options: LMOptions):
        rho_c = torch.where(accept, rho, torch.zeros_like(rho))
        factor = torch.clamp(1.0 - (2.0 * rho_c - 1.0) ** 3, min=1.0 / 3.0)
        mu_new = torch.where(accept, mu * factor, mu * nu)
        nu_new = torch.where(accept, torch.full_like(nu, 2.0), torch.clamp(2.0 * nu, max=2.0**60))
        mu_new = torch.clamp(
            mu_new, min=options.min_damping * scale, max=options.max_damping * scale
        )
        return torch.where(active, mu_new, mu), torch.where(active, nu_new, nu)


class LevenbergMarquardt:
    """init / step / terminate of the damped Gauss-Newton method; the loop is `run_solver`."""

    def __init__(self, options: LMOptions):
        self.options = options
        self.descent = DampedGaussNewton()
        self.search = NielsenDamping()
        self._subset: tuple | None = None  # (params, running indices, their params)

    def init(self, residual_fn: ResidualFn, omega0: Tensor, params: tuple[Tensor, ...]):
        f, grad, normal = evaluate(residual_fn, omega0, params)
        with torch.no_grad():
            d = torch.diagonal(normal, dim1=-2, dim2=-1).detach()  # (P, N)
            dmax = d.amax(-1)
            ok = torch.isfinite(dmax) & (dmax > 0)
            if self.options.scaling == "identity":
                scale = torch.where(ok, dmax, torch.ones_like(dmax))
                diag = torch.ones_like(d)
            else:
                scale = torch.ones_like(dmax)
                diag = self._diag(torch.zeros_like(d), d)
            mu, nu = self.search.init(scale, self.options)
        false = torch.zeros_like(f, dtype=torch.bool)
        return LMState(omega0, f, grad, normal, diag, mu, nu, scale, false, false)

    @staticmethod
    def _diag(previous: Tensor, d: Tensor) -> Tensor:
        # More's scaling: running max of diag(J^T J); zero (or non-finite) entries take the
        # largest entry of the problem, or 1, so that D stays positive definite.
        d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
        d = torch.maximum(previous, d)
        fill = d.amax(-1, keepdim=True)
        fill = torch.where(fill > 0, fill, torch.ones_like(fill))
        return torch.where(d > 0, d, fill)

    def _running_params(self, params: tuple[Tensor, ...], idx: Tensor) -> tuple[Tensor, ...]:
        """The params of the problems still running. Kept while that set stays the same
        (problems only ever stop): the rows are copied once per change of the set instead
        of once per iteration, about a tenth of a solve's time when a few problems need
        many more iterations than the rest."""
        cached = self._subset
        if cached is not None and cached[0] is params and torch.equal(cached[1], idx):
            return cached[2]
        sub = tuple(p.index_select(0, idx) for p in params)
        self._subset = (params, idx, sub)
        return sub

    def step(self, residual_fn, params, state: LMState, active: Tensor) -> LMState:
        tol = self.options.tolerance
        delta, singular = self.descent(state.normal, state.grad, state.mu, state.diag)  # (P, N)
        trial = state.omega + delta

        # Evaluate only the problems still running (the rest keep their state).
        idx = active.nonzero().squeeze(-1)
        if idx.numel() == active.numel():
            f_t, grad_t, normal_t = evaluate(residual_fn, trial, params)
        else:
            sub = self._running_params(params, idx)
            f_s, grad_s, normal_s = evaluate(residual_fn, trial.index_select(0, idx), sub)
            f_t = state.f.index_copy(0, idx, f_s)
            grad_t = state.grad.index_copy(0, idx, grad_s)
            normal_t = state.normal.index_copy(0, idx, normal_s)

        with torch.no_grad():  # the damping control is not differentiated
            d = delta.detach()
            predicted = -(state.grad.detach() * d).sum(-1) - 0.5 * torch.einsum(
                "pi,pij,pj->p", d, state.normal.detach(), d
            )  # (P,) decrease of the quadratic model
            actual = state.f.detach() - f_t.detach()
            finite = _all_finite(f_t.detach(), grad_t.detach(), normal_t.detach())
            usable = finite & (predicted > 0) & ~singular
            safe_pred = torch.where(usable, predicted, torch.ones_like(predicted))
            rho = torch.where(usable, actual / safe_pred, torch.full_like(actual, -math.inf))
            # Below the resolution of f (a residual left at the minimum, gradient near
            # round-off) rho is noise: such a step is taken without changing the damping.
            resolution = _RESOLUTION * torch.finfo(f_t.dtype).eps * state.f.detach().abs()
            neutral = (
                active
                & finite
                & ~singular
                & (rho <= 0)
                & (predicted >= 0)
                & (predicted <= resolution)
                & (actual >= -resolution)
            )
            accept = active & usable & (rho > 0)
            mu, nu = self.search.update(
                state.mu,
                state.nu,
                rho,
                accept,
                active & ~singular & ~neutral,
                state.scale,
                self.options,
            )
            step_norm = torch.linalg.vector_norm(d, dim=-1)
            omega_norm = torch.linalg.vector_norm(state.omega.detach(), dim=-1)
            take = accept | neutral
            # Only an accepted step taken with damping no larger than the largest curvature
            # counts: a step made tiny by heavy damping says nothing about convergence.
            gauss_newton_like = state.mu <= state.scale
            small_step = accept & gauss_newton_like & (step_norm <= tol * (omega_norm + tol))
            if self.options.scaling == "diagonal":
                d_t = torch.diagonal(normal_t.detach(), dim1=-2, dim2=-1)
                diag = torch.where(take[:, None], self._diag(state.diag, d_t), state.diag)
            else:
                diag = state.diag

        a1, a2 = take[:, None], take[:, None, None]
        return LMState(
            omega=torch.where(a1, trial, state.omega),
            f=torch.where(take, f_t, state.f),
            grad=torch.where(a1, grad_t, state.grad),
            normal=torch.where(a2, normal_t, state.normal),
            diag=diag,
            mu=mu,
            nu=nu,
            scale=state.scale,
            small_step=small_step,
            singular=active & singular,
        )

    def terminate(self, state: LMState) -> tuple[Tensor, Tensor]:
        """(stop (P,) bool, result (P,) int64) from the convergence rule and the descent."""
        with torch.no_grad():
            col = torch.diagonal(state.normal, dim1=-2, dim2=-1).clamp(min=0).sqrt()  # (P, N)
            rnorm = (2.0 * state.f).clamp(min=0).sqrt()  # (P,)
            denom = col * rnorm[:, None]
            g = state.grad.abs()
            cosine = torch.where(
                denom > 0, g / torch.where(denom > 0, denom, 1.0), torch.zeros_like(g)
            )
            converged = (cosine.amax(-1) <= self.options.tolerance) | state.small_step
            stop = converged | state.singular
            result = torch.where(
                state.singular,
                torch.full_like(state.f, RESULTS.singular, dtype=torch.int64),
                torch.full_like(state.f, RESULTS.successful, dtype=torch.int64),
            )
        return stop, result


def _validate(omega0: Tensor, params, options, name: str = "omega0") -> tuple[Tensor, ...]:
    """Check the batch layout; returns params as a tuple. `name` is omega0's name in errors."""
    if not isinstance(options, LMOptions):
        raise ValueError(f"options: expected LMOptions, got {type(options).__name__}")
    if not isinstance(omega0, Tensor) or omega0.dim() != 2:
        shape = tuple(omega0.shape) if isinstance(omega0, Tensor) else type(omega0).__name__
        raise ValueError(f"{name}: expected a (P, N) tensor, got {shape}")
    if not omega0.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {omega0.dtype}")
    if omega0.shape[0] < 1 or omega0.shape[1] < 1:
        raise ValueError(f"{name}: needs P >= 1 problems and N >= 1 unknowns, got {omega0.shape}")
    if isinstance(params, Tensor) or not isinstance(params, (tuple, list)):
        raise ValueError("params: expected a tuple of tensors (use (t,) for a single tensor)")
    params = tuple(params)
    n_problems = omega0.shape[0]
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise ValueError(f"params[{i}]: expected a tensor, got {type(p).__name__}")
        if p.dim() == 0 or p.shape[0] != n_problems:
            raise ValueError(
                f"params[{i}]: leading dim must be the number of problems P={n_problems} "
                f"(from {name}), got shape {tuple(p.shape)}"
            )
        if p.is_floating_point() and p.dtype != omega0.dtype:
            raise ValueError(f"params[{i}]: dtype {p.dtype} differs from {name}'s {omega0.dtype}")
        if p.device != omega0.device:
            raise ValueError(f"params[{i}]: device {p.device} differs from {name}'s")
    return params


def run_solver(solver: LevenbergMarquardt, residual_fn, omega0, params) -> tuple:
    """The driver: loop, per-problem step counts, non-finite check, result codes.

    Differentiable when called with autograd enabled on tensors that require grad (that is
    how `solve_unrolled` records every iteration). Returns (final state, iterations, result).
    """
    options = solver.options
    n_problems = omega0.shape[0]
    state = solver.init(residual_fn, omega0, params)
    iterations = torch.zeros(n_problems, dtype=torch.int64, device=omega0.device)
    result = torch.full_like(iterations, RESULTS.max_iterations_reached)
    done = torch.zeros(n_problems, dtype=torch.bool, device=omega0.device)

    def classify(state, done, result):
        with torch.no_grad():
            stop, code = solver.terminate(state)
            nonfinite = ~_all_finite(state.omega, state.f, state.grad, state.normal)
            code = torch.where(nonfinite, torch.full_like(code, RESULTS.nonfinite), code)
            new = ~done & (stop | nonfinite)
            return done | new, torch.where(new, code, result)

    done, result = classify(state, done, result)
    for _ in range(options.max_iterations):
        if bool(done.all()):
            break
        active = ~done
        state = solver.step(residual_fn, params, state, active)
        iterations += active
        done, result = classify(state, done, result)
    return state, iterations, result


def levenberg_marquardt(
    residual_fn: ResidualFn,
    omega0: Tensor,
    params: tuple[Tensor, ...],
    options: LMOptions = LMOptions(),
    throw: bool = False,
) -> LMSolution:
    """Solve P problems min_omega 1/2 ||residual_fn(omega, params_p)||^2, without autograd.

    residual_fn(omega (N,), params for ONE problem) -> r (M,), a pure torch function usable
    under torch.func; it is vmapped over the leading P dim of omega0 (P, N) and of every
    params tensor. Returns the solution with per-problem diagnostics; with throw=True a
    problem that did not converge raises `SolverError` (its `.solution` has the details).
    """
    params = _validate(omega0, params, options)
    solver = LevenbergMarquardt(options)
    with torch.no_grad():
        state, iterations, result = run_solver(
            solver, residual_fn, omega0.detach(), tuple(p.detach() for p in params)
        )
    solution = LMSolution(
        omega=state.omega,
        iterations=iterations,
        residual_norm=(2.0 * state.f).clamp(min=0).sqrt(),
        converged=result == RESULTS.successful,
        result=result,
    )
    if throw and not bool(solution.converged.all()):
        n_failed = int((~solution.converged).sum())
        raise SolverError(
            f"levenberg_marquardt: {n_failed} of {omega0.shape[0]} problems failed: "
            f"{solution.failures()}",
            solution,
        )
    return solution


def initial_omega(params, omega0: Tensor | None, n_unknowns: int | None) -> Tensor:
    """omega0 as given, or zeros (P, n_unknowns) in the dtype/device of the first float param."""
    if omega0 is not None:
        return omega0
    if isinstance(n_unknowns, bool) or not isinstance(n_unknowns, int) or n_unknowns < 1:
        raise ValueError(
            f"n_unknowns: an int >= 1 is needed when omega0 is None, got {n_unknowns!r}"
        )
    if isinstance(params, Tensor) or not isinstance(params, (tuple, list)) or not params:
        raise ValueError("params: expected a non-empty tuple of tensors")
    floats = [p for p in params if isinstance(p, Tensor) and p.is_floating_point()]
    if not floats or floats[0].dim() == 0:
        raise ValueError("params: needs a floating tensor with a leading problem dim")
    ref = floats[0]
    return torch.zeros(ref.shape[0], n_unknowns, dtype=ref.dtype, device=ref.device)


def starting_point(residual_fn, params, n_unknowns: int) -> Tensor:
    """Where a solve starts when the caller has no omega0: the residual's own
    `initial_guess(params)` when it has one (on detached params), else zeros."""
    guess = getattr(residual_fn, "initial_guess", None)
    if guess is None:
        return initial_omega(params, None, n_unknowns)
    return guess(tuple(p.detach() for p in params))
