"""Implicit differentiation of the Levenberg-Marquardt solution (implicit function theorem).

The forward solve (`levenberg_marquardt`) runs without autograd. The backward never
back-propagates through its iterations; it uses only what holds at the solution. There the
first-order optimality condition of min_omega 1/2 ||r(omega, theta)||^2 holds:

    g(omega*, theta) = J_omega(omega*, theta)^T r(omega*, theta) = 0,

stated once, for one problem, by `optimality`. Differentiating g = 0 w.r.t. theta gives
d omega* / d theta = -H^{-1} dg/dtheta with H = dg/domega, the *exact* derivative of g
(J^T J plus the second-order term sum_i r_i Hess r_i; Gauss-Newton's J^T J alone would give
a wrong gradient whenever the residual at the solution is not zero). For an incoming
cotangent omega_bar the vector-Jacobian product is therefore

    solve  H^T lambda = -omega_bar,      theta_bar = (dg/dtheta)^T lambda,

which is what `implicit_vjp` computes, batched over problems:

* H in closed form (J^T J + the curvature) for a `ClosedFormResidual`, else by
  `torch.func.jacfwd` of g (forward-over-reverse: N tangents, N <= 64), vmapped over P;
* lambda by a direct LU solve (`torch.linalg.solve_ex`) per problem;
* theta_bar from the residual's closed-form pullback (outer products, no autograd graph;
  the PDE's constants get zeros), else by `torch.func.vjp` of g w.r.t. the params, with
  lambda as cotangent.

Why this instead of unrolling: memory is that of one linearisation, not of every iteration,
and the cost does not grow with the number of iterations (`unrolled.solve_unrolled` is the
baseline the benchmark compares against). Problems whose H is singular (LU zero pivot, or
reciprocal condition number below N * eps), or non-finite, get a zero gradient, and are
counted rather than hidden: `stats` / `LMSolution.adjoint` report {"singular": k,
"nonfinite": k} (the singular count includes the non-finite ones).

`ImplicitSolve` is the autograd.Function tying both together; `solve` is the convenience
entry point that returns the differentiable solution and the forward diagnostics.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.func import jacfwd, vjp, vmap

from actors.constraint.levenberg_marquardt import (
    ResidualFn,
    _validate,
    initial_omega,
    levenberg_marquardt,
)
from actors.constraint.residual import RowOuter, dense, normal_terms
from actors.constraint.solution import LMOptions, LMSolution, SolverError


def optimality(residual_fn: ResidualFn, omega: Tensor, params: tuple[Tensor, ...]) -> Tensor:
    """g(omega, theta) = J_omega^T r for ONE problem: omega (N,) -> (N,); zero at a minimum."""
    r, pullback = vjp(lambda w: residual_fn(w, params), omega)
    (g,) = pullback(r)
    return g


def _adjoint(
    residual_fn, omega, params, omega_bar, wrt, factored: bool = False
) -> tuple[list, dict[str, int]]:
    """theta_bar for the params flagged in wrt (None for the others), and the counts.
    With `factored`, row matrices' cotangents stay `RowOuter` factors where the residual's
    closed form gives them."""
    omega, omega_bar = omega.detach(), omega_bar.detach()
    params = tuple(p.detach() for p in params)
    n = omega.shape[-1]

    hess = _hessian(residual_fn, omega, params)  # (P, N, N)
    finite = torch.isfinite(hess).flatten(1).all(-1)  # (P,)
    eye = torch.eye(n, dtype=hess.dtype, device=hess.device)
    safe = torch.where(finite[:, None, None], hess, eye)
    sv = torch.linalg.svdvals(safe)  # (P, N), descending
    eps = torch.finfo(hess.dtype).eps
    well_posed = sv[:, -1] > n * eps * sv[:, 0]
    lam, info = torch.linalg.solve_ex(safe.mT, -omega_bar.unsqueeze(-1))  # (P, N, 1)
    lam = lam.squeeze(-1)
    ok = finite & well_posed & (info == 0) & torch.isfinite(lam).all(-1)
    lam = torch.where(ok[:, None], lam, torch.zeros_like(lam))
    stats = {"singular": int((~ok).sum()), "nonfinite": int((~finite).sum())}

    index = [i for i, w in enumerate(wrt) if w]
    grads: list = [None] * len(params)
    if not index:
        return grads, stats

    if getattr(residual_fn, "pullback", None) is not None:
        pulled = _pull_closed_form(residual_fn, omega, params, lam, index)
        if not factored:
            pulled = [dense(g) for g in pulled]
    else:
        pulled = _pull_generic(residual_fn, omega, params, lam, index)
    all_ok = bool(ok.all())  # lambda is already zero where not ok; this catches inf * 0
    for i, gi in zip(index, pulled, strict=True):
        if all_ok:
            grads[i] = gi
        elif isinstance(gi, RowOuter):
            grads[i] = gi.where(ok)
        else:
            mask = ok.reshape((-1,) + (1,) * (gi.dim() - 1))
            grads[i] = torch.where(mask, gi, torch.zeros_like(gi))
    return grads, stats


def _hessian(residual_fn, omega: Tensor, params: tuple[Tensor, ...]) -> Tensor:
    """H = dg/domega (P, N, N): J^T J + curvature in closed form, or jacfwd of g."""
    if getattr(residual_fn, "curvature", None) is not None:
        r, blocks = residual_fn.linearize(omega, params)
        return normal_terms(r, blocks)[1] + residual_fn.curvature(omega, params, r)
    return vmap(jacfwd(lambda w, p: optimality(residual_fn, w, p)))(omega, params)


def _pull_closed_form(residual_fn, omega, params, lam, index) -> list[Tensor | RowOuter]:
    """(dg/dtheta)^T lambda for the flagged params from the residual's closed form;
    zeros for the params it does not differentiate."""
    pulled = residual_fn.pullback(omega, params, lam)
    return [torch.zeros_like(params[i]) if pulled[i] is None else pulled[i] for i in index]


def _pull_generic(residual_fn, omega, params, lam, index) -> tuple[Tensor, ...]:
    """(dg/dtheta)^T lambda by torch.func.vjp of `optimality`, vmapped over problems."""

    def pull(w, p, lam_p):
        def g_of(*sub):
            full = list(p)
            for i, s in zip(index, sub, strict=True):
                full[i] = s
            return optimality(residual_fn, w, tuple(full))

        _, pullback = vjp(g_of, *(p[i] for i in index))
        return pullback(lam_p)

    return vmap(pull)(omega, params, lam)


def implicit_vjp(
    residual_fn: ResidualFn,
    omega: Tensor,
    params: tuple[Tensor, ...],
    omega_bar: Tensor,
    stats: dict | None = None,
    factored: bool = False,
) -> tuple[Tensor | RowOuter, ...]:
    """theta_bar (same shapes as params) of the solution omega (P, N) for the cotangent
    omega_bar (P, N), by the implicit function theorem at omega (assumed a minimiser).
    With `factored`, a row matrix's cotangent from a closed-form pullback comes as its
    `RowOuter` factors (N / 2 times smaller; `dense()` expands it).

    Non-floating params (e.g. index tensors) get zeros. Problems with a singular or
    non-finite H get zero gradients; if `stats` is a dict it receives
    {"singular": k, "nonfinite": k}.
    """
    params = _validate(omega, params, LMOptions(), name="omega")
    if not isinstance(omega_bar, Tensor) or omega_bar.shape != omega.shape:
        got = tuple(omega_bar.shape) if isinstance(omega_bar, Tensor) else type(omega_bar)
        raise ValueError(f"omega_bar: expected shape {tuple(omega.shape)}, got {got}")
    wrt = [p.is_floating_point() or p.is_complex() for p in params]
    grads, counts = _adjoint(residual_fn, omega, params, omega_bar, wrt, factored)
    if stats is not None:
        stats.update(counts)
    pairs = zip(params, grads, strict=True)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in pairs)


class ImplicitSolve(torch.autograd.Function):
    """apply(residual_fn, options, omega0, *params) -> omega (P, N).

    Forward: `levenberg_marquardt` without autograd; the LMSolution is kept on the context
    (`omega.grad_fn.solution`). Backward: `implicit_vjp` for the params that need a
    gradient; its counts go to `solution.adjoint`. omega0 gets no gradient (the minimiser
    does not depend on the starting point).
    """

    @staticmethod
    def forward(ctx, residual_fn, options, omega0, *params):
        solution = levenberg_marquardt(residual_fn, omega0, params, options)
        ctx.residual_fn = residual_fn
        ctx.solution = solution
        ctx.save_for_backward(solution.omega, *params)
        return solution.omega.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, omega_bar):
        omega, *params = ctx.saved_tensors
        wrt = ctx.needs_input_grad[3:]
        grads, counts = _adjoint(ctx.residual_fn, omega, tuple(params), omega_bar, wrt)
        ctx.solution.adjoint.update(counts)
        return (None, None, None, *grads)


def solve(
    residual_fn: ResidualFn,
    params: tuple[Tensor, ...],
    omega0: Tensor | None = None,
    options: LMOptions = LMOptions(),
    *,
    n_unknowns: int | None = None,
    throw: bool = False,
) -> tuple[Tensor, LMSolution]:
    """Differentiable batched solve: (omega (P, N), diagnostics).

    omega0 defaults to zeros of shape (P, n_unknowns) (n_unknowns is then required, since
    N cannot be read off a residual function). The gradient of omega w.r.t. params is the
    implicit one (`ImplicitSolve`); without grad mode or params requiring grad this is
    just `levenberg_marquardt`. throw=True raises `SolverError` if a problem failed.
    """
    omega0 = initial_omega(params, omega0, n_unknowns)
    params = _validate(omega0, params, options)
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    if needs_grad:
        omega = ImplicitSolve.apply(residual_fn, options, omega0, *params)
        solution = omega.grad_fn.solution
    else:
        solution = levenberg_marquardt(residual_fn, omega0, params, options)
        omega = solution.omega
    if throw and not bool(solution.converged.all()):
        n_failed = int((~solution.converged).sum())
        raise SolverError(
            f"solve: {n_failed} of {omega.shape[0]} problems failed: {solution.failures()}",
            solution,
        )
    return omega, solution
