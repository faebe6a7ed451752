"""The common interface of the PDE constraints, and the lookup by data-set PDE name.

A constraint is everything PDE-specific of the three variants (PI-SC, PI-HC, PI-HC-MoE):

* the network's side (autograd, on the driver): `inputs` builds the network input from
  the initial condition, `derivatives` differentiates the basis (or u, as one basis
  function) on the global grid, `physics_loss` is the training loss;
* the experts' side: `expert_params` cuts expert k's problem out of the derivatives as a
  tuple of tensors with leading dim B (rows at its collocation points, its initial and
  boundary rows, targets, constants), and `residual_fn` is the module-level pure function
  r(omega (N,), params) -> (M,) for ONE sample that the solver vmaps over the batch and
  differentiates with torch.func. An expert needs nothing else, so the detached tuple and
  the function's qualified name are all that crosses a process boundary. On the driver
  the tuple stays a differentiable function of the basis: the implicit backward returns
  gradients w.r.t. these tensors, and autograd carries them on to the network.

The classes live in `diffusion_sorption` and `navier_stokes`; `constraint_for` maps a
data set manifest's `pde` block (name and parameters) to one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from torch import Tensor

from actors.pinn.diffusion_sorption import DiffusionSorptionConstraint
from actors.pinn.navier_stokes import NavierStokesConstraint
from actors.pinn.partition import Partition

ResidualFn = Callable[[Tensor, tuple[Tensor, ...]], Tensor]  # omega (N,), params -> r (M,)


class PDEConstraint(Protocol):
    name: str  # "diffusion-sorption" | "navier-stokes"
    field: str  # the data set's field: "u" | "vorticity"
    axes: tuple[str, ...]  # grid axes, time first: ("t", "x") | ("t", "x", "y")
    periodic: tuple[bool, ...]  # per grid axis (the FNO pads the non-periodic ones)
    dims: int  # len(axes)
    in_channels: int  # channels of inputs(): coordinates + the initial condition
    residual_fn: ResidualFn  # module-level pure function, picklable by reference
    row_keys: tuple[str, ...]  # the `derivatives` fields an expert takes rows of

    def inputs(self, initial: Tensor, grids: Mapping[str, Any]) -> Tensor:
        """initial (B, *space) -> network input (B, in_channels, *grid)."""
        ...

    def derivatives(self, basis: Tensor, grids: Mapping[str, Any]) -> dict[str, Tensor]:
        """basis (B, N, *grid) -> named derivative arrays, (B, N, *grid) or traces."""
        ...

    def expert_params(
        self,
        derivs: dict[str, Tensor],
        initial: Tensor,
        partition: Partition,
        k: int,
        points: Tensor,
        grids: Mapping[str, Any] | None = None,
        rows: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, ...]:
        """Expert k's problem data, leading dim B, for `residual_fn` (differentiable
        w.r.t. the basis behind `derivs`; detach to ship). `rows`: the `row_keys` fields
        already gathered at `points` (B, m, N), when the caller gathered for all experts."""
        ...

    def residual_field(self, u: Tensor, grids: Mapping[str, Any]) -> Tensor:
        """u (B, *grid) -> the PDE residual on the full grid (B, *grid)."""
        ...

    def physics_loss(self, u: Tensor, initial: Tensor, grids: Mapping[str, Any]) -> Tensor:
        """u (B, *grid) -> scalar: mean over the batch of the residual norms."""
        ...


_CONSTRAINTS: dict[str, type] = {
    DiffusionSorptionConstraint.name: DiffusionSorptionConstraint,
    NavierStokesConstraint.name: NavierStokesConstraint,
}
# Parameters a data set records that describe how its samples were drawn, not the PDE.
_DATA_ONLY: dict[str, frozenset[str]] = {
    DiffusionSorptionConstraint.name: frozenset(
        {"initial_low", "initial_high", "initial_condition"}
    ),
    NavierStokesConstraint.name: frozenset({"grf_alpha", "grf_tau"}),
}


def constraint_fields(pde_name: str) -> frozenset[str]:
    """The settings the constraint of `pde_name` takes (its dataclass fields)."""
    if pde_name not in _CONSTRAINTS:
        raise ValueError(f"pde_name: unknown PDE {pde_name!r}; known: {sorted(_CONSTRAINTS)}")
    return frozenset(_CONSTRAINTS[pde_name].__dataclass_fields__)


def constraint_for(pde_name: str, parameters: Mapping[str, Any] | None = None) -> PDEConstraint:
    """The constraint of a data set's PDE with its recorded parameters.

    Parameters that set how initial conditions were drawn (e.g. "initial_low",
    "grf_alpha") are ignored; any other unknown parameter is an error.
    """
    if pde_name not in _CONSTRAINTS:
        raise ValueError(f"pde_name: unknown PDE {pde_name!r}; known: {sorted(_CONSTRAINTS)}")
    cls = _CONSTRAINTS[pde_name]
    known = set(cls.__dataclass_fields__)
    kwargs = {}
    for key, value in dict(parameters or {}).items():
        if key in _DATA_ONLY[pde_name]:
            continue
        if key not in known:
            raise ValueError(
                f"parameters: unknown parameter {key!r} for {pde_name}; known: {sorted(known)}"
            )
        if isinstance(value, bool):  # a switch (balance_rows), not a number
            kwargs[key] = value
            continue
        try:
            kwargs[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"parameters: {key!r} must be a number, got {value!r}") from None
    return cls(**kwargs)
