"""Residuals that also know their Jacobian and curvature in closed form.

The solver only needs, per problem, r (M,), J = dr/domega (M, N) and, for the implicit
backward, H = J^T J + sum_i r_i Hess(r_i). `torch.func.jacfwd` gets J with N forward tangents
and H with N forward-over-reverse passes, vmapped over problems: O(M N^2) work done N times
over through generic machinery. The hard-constraint residuals are low-order polynomials in
omega through a few row matrices (u = U omega, u_t = T omega, ...), so J is a sum of
row-scaled copies of those matrices and the curvature a sum of U^T diag(c) T products:
O(M N) for J and one batched matmul for the curvature, with no tangent loop at all.

`ClosedFormResidual` bundles the per-problem function (still used by `vmap`/`jacfwd`
callers, the unrolled baseline and tests) with the batched closed forms; the solver and the
implicit backward (H and the params' cotangent) use the closed forms when a residual has
them and fall back to
`torch.func` otherwise, so any pure residual function keeps working.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PerProblem = Callable[[Tensor, tuple[Tensor, ...]], Tensor]
Linearize = Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, tuple[Tensor, ...]]]
Curvature = Callable[[Tensor, tuple[Tensor, ...], Tensor], Tensor]
Pullback = Callable[[Tensor, tuple[Tensor, ...], Tensor], tuple[Tensor | None, ...]]


@dataclass(frozen=True)
class ClosedFormResidual:
    """r for one problem, plus batched closed forms of (r, J) and of the curvature.

    * `residual(omega (N,), params) -> r (M,)`: one problem, pure torch;
    * `linearize(omega (P, N), params (leading P)) -> (r (P, M), J_blocks)`: J's row blocks
      (P, M_k, N) in the order of r's rows, never concatenated (J^T J and J^T r are sums
      over blocks, so the largest block is the only copy of its size);
    * `curvature(omega (P, N), params, r (P, M)) -> (P, N, N)`: sum_i r_i Hess(r_i);
    * `pullback(omega (P, N), params, lam (P, N)) -> per param (d(J^T r)/d param)^T lam`,
      or None for a param that is not differentiated (the PDE's constants: they come from
      the spec, never from the network). With F = sum_i r_i s_i, s = J lam, each row
      matrix's gradient is a sum of two outer products alpha_i omega^T + beta_i lam^T,
      returned as their factors (`RowOuter`).

    An instance lives at module level under `name` in the module of
    its functions, and pickles as a reference to it (like a function), so every process
    uses its own import of the same code.
    """

    name: str
    residual: PerProblem
    linearize: Linearize
    curvature: Curvature
    pullback: Pullback
    # (params) -> omega0 (P, N): where the solver starts, when zero is a bad place to
    # (None: from zero)
    initial_guess: Callable[[tuple[Tensor, ...]], Tensor] | None = None

    def __call__(self, omega: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        return self.residual(omega, params)

    def __reduce__(self):
        return _module_attribute, (self.residual.__module__, self.name)


def _module_attribute(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def normal_terms(r: Tensor, blocks: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """(J^T r (P, N), J^T J (P, N, N)) from r (P, M) and J's row blocks."""
    sizes = [b.shape[1] for b in blocks]
    grad, normal = None, None
    for r_k, jac_k in zip(r.split(sizes, dim=-1), blocks, strict=True):
        g = (jac_k.mT @ r_k.unsqueeze(-1)).squeeze(-1)
        n = jac_k.mT @ jac_k
        grad, normal = (g, n) if grad is None else (grad + g, normal + n)
    return grad, normal


@dataclass(frozen=True)
class RowOuter:
    """alpha_i omega^T + beta_i lam^T per row, kept as its factors: `coefficients`
    (P, m, 2) = [alpha, beta] and `vectors` (P, 2, N) = [omega; lam].

    A row matrix's cotangent is rank 2 per problem, so the factors are N / 2 times smaller
    than the (P, m, N) they stand for: an expert on another process or node sends these
    back and the driver expands them (`dense`) where the gradient is consumed."""

    coefficients: Tensor
    vectors: Tensor

    def dense(self) -> Tensor:
        # one rank-2 batched matmul: a single (P, m, N) result, no temporaries of that size
        return self.coefficients @ self.vectors

    def where(self, ok: Tensor) -> RowOuter:
        """Zero for the problems where `ok` (P,) is False, whatever their factors hold."""
        keep = ok.reshape(-1, 1, 1)
        return RowOuter(
            torch.where(keep, self.coefficients, torch.zeros_like(self.coefficients)),
            torch.where(keep, self.vectors, torch.zeros_like(self.vectors)),
        )

    def to(self, *args, **kwargs) -> RowOuter:
        return RowOuter(self.coefficients.to(*args, **kwargs), self.vectors.to(*args, **kwargs))


def outer_rows(alpha: Tensor, omega: Tensor, beta: Tensor, lam: Tensor) -> RowOuter:
    """alpha_i omega^T + beta_i lam^T per row, batched: (P, m), (P, N) x2 -> the factors of
    the (P, m, N) result (`RowOuter.dense()` builds it)."""
    return RowOuter(torch.stack([alpha, beta], dim=-1), torch.stack([omega, lam], dim=-2))


def dense(value: Tensor | RowOuter) -> Tensor:
    """A cotangent as a plain tensor, whichever form it came in."""
    return value.dense() if isinstance(value, RowOuter) else value


def quadratic_form(left: Tensor, weight: Tensor, right: Tensor) -> Tensor:
    """left^T diag(weight) right, batched: (P, m, N), (P, m), (P, m, N) -> (P, N, N)."""
    return left.mT @ (weight.unsqueeze(-1) * right)
