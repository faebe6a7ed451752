"""Physics networks of PI-SC, PI-HC and PI-HC-MoE (plain torch).

* `FNO` - the shared Fourier neural operator (`fno`).
* `Partition` - the experts' fixed sub-domains of the space-time grid (`partition`).
* `DiffusionSorptionConstraint`, `NavierStokesConstraint`, `constraint_for` - per-PDE
  inputs, derivatives, physics loss, and each expert's residual function and parameters
  (`pde`, `diffusion_sorption`, `navier_stokes`; stencils in `stencils`, shared row
  gathering in `rows`).
* `BasisNetwork`, `SoftConstrained`, `assemble` - the networks and u = b . omega_k
  (`model`); `expert_problems`, `solve_in_process` - the experts' problems, and an
  in-process solve for tests and quick use (`in_process`; the Ray path is `actors.experts`).
"""

from actors.pinn.diffusion_sorption import DiffusionSorptionConstraint, diffusion_sorption_residual
from actors.pinn.fno import FNO, Pointwise, SpectralConv
from actors.pinn.in_process import expert_problems, solve_in_process
from actors.pinn.model import BasisNetwork, SoftConstrained, assemble
from actors.pinn.navier_stokes import NavierStokesConstraint, navier_stokes_residual
from actors.pinn.partition import Partition
from actors.pinn.pde import PDEConstraint, ResidualFn, constraint_fields, constraint_for

__all__ = [
    "FNO",
    "BasisNetwork",
    "DiffusionSorptionConstraint",
    "NavierStokesConstraint",
    "PDEConstraint",
    "Partition",
    "Pointwise",
    "ResidualFn",
    "SoftConstrained",
    "SpectralConv",
    "assemble",
    "constraint_fields",
    "constraint_for",
    "diffusion_sorption_residual",
    "expert_problems",
    "navier_stokes_residual",
    "solve_in_process",
]
