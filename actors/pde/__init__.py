"""Numerical PDE simulators used to generate training data (plain numpy/scipy).

* `DiffusionSorption` - 1-D diffusion-sorption (PDEBench), finite volumes + BDF.
* `navier_stokes` - 2-D incompressible Navier-Stokes (vorticity), pseudo-spectral.
"""

from actors.pde import navier_stokes
from actors.pde.diffusion_sorption import (
    DiffusionSorption,
    cell_centres,
    random_initial_condition,
)
from actors.pde.navier_stokes import gaussian_random_field

__all__ = [
    "DiffusionSorption",
    "cell_centres",
    "gaussian_random_field",
    "navier_stokes",
    "random_initial_condition",
]
