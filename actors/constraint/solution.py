"""Options, result codes and the solution record of the Levenberg-Marquardt solve.

Failure is data: every problem of a batch gets a `RESULTS` code with a human message, and
`LMSolution.summary()` turns a batch into JSON-friendly floats for logging. `SolverError`
is raised only on request (`throw=True`) and carries the solution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

_SCALINGS = ("identity", "diagonal")


class RESULTS:
    """Per-problem result codes of a solve; `message(code)` says what each means."""

    successful = 0
    max_iterations_reached = 1
    nonfinite = 2
    singular = 3

    _names = ("successful", "max_iterations_reached", "nonfinite", "singular")
    _messages = (
        "converged",
        "the maximum number of iterations was reached before convergence",
        "the residual or its Jacobian became non-finite (NaN or Inf)",
        "the damped normal equations could not be solved (singular matrix)",
    )

    @classmethod
    def name(cls, code: int) -> str:
        return cls._names[int(code)]

    @classmethod
    def message(cls, code: int) -> str:
        code = int(code)
        if not 0 <= code < len(cls._messages):
            raise ValueError(f"code: unknown result code {code}")
        return cls._messages[code]

    @classmethod
    def codes(cls) -> tuple[int, ...]:
        return tuple(range(len(cls._names)))


class SolverError(RuntimeError):
    """Raised by `levenberg_marquardt(..., throw=True)`; `.solution` holds the diagnostics."""

    def __init__(self, message: str, solution: LMSolution):
        super().__init__(message)
        self.solution = solution


@dataclass(frozen=True)
class LMOptions:
    """Options of the Levenberg-Marquardt solve.

    max_iterations: steps (accepted or rejected) per problem before `max_iterations_reached`.
    tolerance: `tol` of the convergence rule in the module docstring (cosine of r with the
        columns of J, or relative accepted step).
    initial_damping: mu0. With `scaling="identity"` it is relative to max diag(J^T J) at
        omega0 (Nielsen's tau); with `scaling="diagonal"` D = diag(J^T J) carries the scale
        and mu0 is used as is (Marquardt).
    min_damping, max_damping: bounds on mu, in the same relative units as `initial_damping`.
        min_damping is the ridge that keeps the damped normal matrix positive definite.
    scaling: "identity" (D = I, Nielsen) or "diagonal" (D = running max of diag(J^T J),
        Marquardt/More; invariant to rescaling the unknowns).
    """

    max_iterations: int = 50
    tolerance: float = 1e-4
    initial_damping: float = 1e-3
    min_damping: float = 1e-12
    max_damping: float = 1e12
    scaling: str = "identity"

    def __post_init__(self):
        if isinstance(self.max_iterations, bool) or not isinstance(self.max_iterations, int):
            raise ValueError(f"max_iterations: expected an int, got {self.max_iterations!r}")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations: must be >= 1, got {self.max_iterations}")
        for name in ("tolerance", "initial_damping", "min_damping", "max_damping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: expected a number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be finite and > 0, got {value}")
        if not self.min_damping <= self.initial_damping <= self.max_damping:
            raise ValueError(
                "initial_damping: must lie in [min_damping, max_damping], got "
                f"{self.initial_damping} not in [{self.min_damping}, {self.max_damping}]"
            )
        if self.scaling not in _SCALINGS:
            raise ValueError(f"scaling: expected one of {_SCALINGS}, got {self.scaling!r}")


@dataclass
class LMSolution:
    """Result of a batched solve; every tensor has the problems along dim 0."""

    omega: Tensor  # (P, N)
    iterations: Tensor  # (P,) int64, steps each problem took
    residual_norm: Tensor  # (P,) final ||r||_2
    converged: Tensor  # (P,) bool
    result: Tensor  # (P,) int64 RESULTS codes
    # Filled by the implicit backward (`ImplicitSolve`): {"singular": k, "nonfinite": k}.
    adjoint: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """JSON-friendly floats for logging: iterations, convergence, residuals, result counts.

        Residual statistics are over the problems with a finite residual norm (NaN if none).
        """
        norms = self.residual_norm.detach()
        finite = norms[torch.isfinite(norms)]
        out = {
            "problems": float(self.omega.shape[0]),
            "iterations_mean": float(self.iterations.double().mean()),
            "iterations_max": float(self.iterations.max()),
            "converged_fraction": float(self.converged.double().mean()),
            "residual_norm_mean": float(finite.mean()) if finite.numel() else math.nan,
            "residual_norm_max": float(finite.max()) if finite.numel() else math.nan,
        }
        for code in RESULTS.codes():
            out[RESULTS.name(code)] = float((self.result == code).sum())
        return out

    def failures(self) -> str:
        """One line per failing result code: count and message ('' if all converged)."""
        lines = []
        for code in RESULTS.codes()[1:]:
            count = int((self.result == code).sum())
            if count:
                lines.append(f"{count} {RESULTS.name(code)} ({RESULTS.message(code)})")
        return "; ".join(lines)
