"""Where the trajectories of a data set come from: a simulator, or a user's PDEBench file.

A source is described by its spec (part of the preprocess spec) and does two things:
`describe()` — on the driver — says what every sample will look like (fields and shapes,
grids, PDE parameters); `samples(ids)` — on a Dask worker — yields those samples. Each
sample is checked by `check_sample` before anything is written, so a bad one is named
(file or seed, sample id, reason) and never reaches a shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from actors.pde.diffusion_sorption import DiffusionSorption as _DS  # PDEBench's values
from flows.errors import JobFailure, UserError
from flows.spec import Spec, register_tags


@dataclass(frozen=True)
class FieldInfo:
    shape: tuple[int, ...]
    axes: tuple[str, ...]


@dataclass(frozen=True)
class SourceInfo:
    """What every sample of a source looks like."""

    pde: str
    parameters: dict[str, Any]
    fields: dict[str, FieldInfo]
    grids: dict[str, list[float]]
    available: int | None = None  # samples in a file; None for a simulator
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "pde": {"name": self.pde, "parameters": self.parameters},
            "fields": {
                k: {"shape": list(v.shape), "axes": list(v.axes)} for k, v in self.fields.items()
            },
            "grids": self.grids,
        }


@dataclass
class Sample:
    sample_id: int
    source_key: str  # a person can find the sample again from this
    parameters: dict[str, float]
    fields: dict[str, np.ndarray]


class BadSample(UserError):
    """A sample that failed validation; the message names it and the reason."""


class SimulationFailed(JobFailure):
    """A simulator could not produce a sample."""


def check_sample(sample: Sample, info: SourceInfo, where: str) -> None:
    """Raise BadSample unless every field has the declared shape and only finite values."""
    for name, spec in info.fields.items():
        if name not in sample.fields:
            raise BadSample(f"{where}: field {name!r} missing")
        values = np.asarray(sample.fields[name])
        if values.shape != spec.shape:
            raise BadSample(
                f"{where}: field {name!r} has shape {values.shape}, expected {spec.shape}"
            )
        bad = ~np.isfinite(values)
        if bad.any():
            n_nan = int(np.isnan(values).sum())
            raise BadSample(
                f"{where}: field {name!r} has {n_nan} NaN and {int(bad.sum()) - n_nan} "
                f"infinite values"
            )


def check_grid(name: str, grid: np.ndarray, where: str) -> None:
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2:
        raise BadSample(f"{where}: grid {name!r} must be 1-D with at least 2 points")
    if not np.all(np.isfinite(grid)):
        raise BadSample(f"{where}: grid {name!r} has non-finite values")
    if not np.all(np.diff(grid) > 0):
        i = int(np.argmax(np.diff(grid) <= 0))
        raise BadSample(
            f"{where}: grid {name!r} is not strictly increasing "
            f"(index {i}: {grid[i]!r} then {grid[i + 1]!r})"
        )


def sample_rng(seed: int, sample_id: int) -> np.random.Generator:
    """Each sample's own stream: the same sample whatever the chunking or worker."""
    return np.random.default_rng([seed, sample_id])


# Simulated diffusion–sorption ---------------------------------------------------------


class DiffusionSorptionSimulation(Spec):
    """1-D diffusion–sorption (PDEBench's setting), u0 ~ U(initial_low, initial_high).

    The outflow boundary is u(1, t) = -D u_x(1, t), the sign of PDEBench's generator (the
    sign printed in its paper makes the problem ill-posed; see actors/pde).
    """

    pde: Literal["diffusion-sorption"]
    nx: int = Field(1024, ge=8, le=16384, description="finite-volume cells on (0, 1)")
    nt: int = Field(101, ge=2, le=10001, description="output times on [0, t_end]")
    t_end: float = Field(500.0, gt=0)
    diffusivity: float = Field(_DS.diffusivity, gt=0)
    porosity: float = Field(_DS.porosity, gt=0, lt=1)
    bulk_density: float = Field(_DS.bulk_density, ge=0)
    freundlich_k: float = Field(_DS.freundlich_k, ge=0)
    freundlich_exponent: float = Field(_DS.freundlich_exponent, gt=0)
    initial_low: float = Field(0.0, ge=0)
    initial_high: float = Field(0.2, gt=0)
    initial_condition: Literal["constant", "per-cell"] = Field(
        "constant", description="one U(low, high) value per sample (PDEBench), or per cell"
    )
    rtol: float = Field(1e-6, gt=0, lt=1)

    @model_validator(mode="after")
    def _initial_range(self) -> DiffusionSorptionSimulation:
        if self.initial_high <= self.initial_low:
            raise ValueError(
                f"initial_high ({self.initial_high}) must exceed initial_low ({self.initial_low})"
            )
        return self

    def model(self):
        from actors.pde import DiffusionSorption

        return DiffusionSorption(
            diffusivity=self.diffusivity,
            porosity=self.porosity,
            bulk_density=self.bulk_density,
            freundlich_k=self.freundlich_k,
            freundlich_exponent=self.freundlich_exponent,
        )

    def times(self) -> np.ndarray:
        return np.linspace(0.0, self.t_end, self.nt)

    def describe(self) -> SourceInfo:
        from actors.pde import cell_centres

        params = self.model_dump(exclude={"pde", "nx", "nt", "rtol"})
        return SourceInfo(
            pde=self.pde,
            parameters=params,
            fields={"u": FieldInfo(shape=(self.nt, self.nx), axes=("t", "x"))},
            grids={"t": self.times().tolist(), "x": cell_centres(self.nx).tolist()},
        )

    def samples(self, ids: list[int], seed: int) -> Iterator[Sample]:
        from actors.pde import random_initial_condition

        model, times = self.model(), self.times()
        for i in ids:
            rng = sample_rng(seed, i)
            u0 = random_initial_condition(
                rng,
                self.nx,
                self.initial_low,
                self.initial_high,
                per_cell=self.initial_condition == "per-cell",
            )
            try:
                u = model.simulate(u0, times, rtol=self.rtol)  # (nt, nx)
            except (RuntimeError, FloatingPointError) as exc:
                raise SimulationFailed(f"sample {i} (seed {seed}): {exc}") from None
            yield Sample(i, f"seed={seed}/sample={i}", {"diffusivity": self.diffusivity}, {"u": u})


# Simulated Navier–Stokes --------------------------------------------------------------


class NavierStokesSimulation(Spec):
    """2-D incompressible Navier–Stokes, vorticity form, periodic unit square, no forcing."""

    pde: Literal["navier-stokes"]
    resolution: int = Field(64, ge=32, le=256, description="stored grid points per side")
    sim_resolution: int | None = Field(
        None, ge=32, le=1024, description="simulated grid per side (a multiple of resolution)"
    )
    viscosity: float = Field(1e-4, gt=0)
    t_end: float = Field(5.0, gt=0)
    nt: int = Field(64, ge=2, le=1001, description="output times on [0, t_end]")
    cfl: float = Field(0.5, gt=0, le=1.0)
    grf_alpha: float = Field(2.5, gt=1.0)
    grf_tau: float = Field(7.0, gt=0)

    @model_validator(mode="after")
    def _resolutions(self) -> NavierStokesSimulation:
        sim = self.sim_resolution or self.resolution
        if sim < self.resolution or sim % self.resolution:
            raise ValueError(
                f"sim_resolution ({sim}) must be a multiple of resolution ({self.resolution})"
            )
        return self

    def times(self) -> np.ndarray:
        return np.linspace(0.0, self.t_end, self.nt)

    def describe(self) -> SourceInfo:
        n = self.resolution
        grid = (np.arange(n) / n).tolist()
        params = {
            "viscosity": self.viscosity,
            "t_end": self.t_end,
            "grf_alpha": self.grf_alpha,
            "grf_tau": self.grf_tau,
        }
        return SourceInfo(
            pde=self.pde,
            parameters=params,
            fields={"vorticity": FieldInfo(shape=(self.nt, n, n), axes=("t", "x", "y"))},
            grids={"t": self.times().tolist(), "x": grid, "y": grid},
        )

    def samples(self, ids: list[int], seed: int) -> Iterator[Sample]:
        from actors.pde import gaussian_random_field, navier_stokes

        sim = self.sim_resolution or self.resolution
        stride = sim // self.resolution
        times = self.times()
        for i in ids:
            rng = sample_rng(seed, i)
            w0 = gaussian_random_field(rng, sim, alpha=self.grf_alpha, tau=self.grf_tau)
            try:
                w = navier_stokes.simulate(w0, times, viscosity=self.viscosity, cfl=self.cfl)
            except (RuntimeError, FloatingPointError) as exc:
                raise SimulationFailed(f"sample {i} (seed {seed}): {exc}") from None
            yield Sample(
                i,
                f"seed={seed}/sample={i}",
                {"viscosity": self.viscosity},
                {"vorticity": w[:, ::stride, ::stride]},
            )  # (nt, n, n)


register_tags("diffusion-sorption", "navier-stokes")

Simulation = Annotated[
    DiffusionSorptionSimulation | NavierStokesSimulation, Field(discriminator="pde")
]


# PDEBench HDF5 files ------------------------------------------------------------------

DS_PARAMETERS = ("diffusivity", "porosity", "bulk_density", "freundlich_k", "freundlich_exponent")


class PDEBenchIngest(Spec):
    """A PDEBench HDF5 file: per-sample groups (diffusion–sorption) or one `tensor`."""

    path: str = Field(description="local path or s3:// URL of the .h5/.hdf5 file")
    pde: str = Field("diffusion-sorption", min_length=1, description="recorded in the manifest")
    field_name: str = Field("u", min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    parameters: dict[str, float] = Field(
        default_factory=dict,
        description="the PDE's parameters; diffusion-sorption: PDEBench's unless given",
    )

    @model_validator(mode="after")
    def _known_parameters(self) -> PDEBenchIngest:
        known = DS_PARAMETERS if self.pde == "diffusion-sorption" else None
        for key in self.parameters if known is not None else ():
            if key not in known:
                raise ValueError(
                    f"parameters.{key}: diffusion-sorption has no parameter {key!r} "
                    f"(known: {', '.join(known)})"
                )
        return self

    def pde_parameters(self) -> dict[str, float]:
        """What the manifest records: a diffusion–sorption file's parameters default to
        those PDEBench generated all its files with (the file itself records none)."""
        if self.pde != "diffusion-sorption":
            return dict(self.parameters)
        return {**{k: float(getattr(_DS, k)) for k in DS_PARAMETERS}, **self.parameters}

    def _open(self):
        import h5py

        from flows.storage import Storage

        storage = Storage.at(self.path)
        try:
            handle = storage.fs.open(storage.url, "rb")
        except FileNotFoundError:
            raise UserError(f"ingest.path: {self.path}: file not found") from None
        except IsADirectoryError:
            raise UserError(f"ingest.path: {self.path}: a folder, not an HDF5 file") from None
        try:
            return h5py.File(handle, "r")
        except OSError:
            handle.close()
            raise UserError(f"ingest.path: {self.path}: not an HDF5 file") from None

    def describe(self) -> SourceInfo:
        with self._open() as f:
            layout = _layout(f, self.path)
            if layout == "tensor":
                tensor = f["tensor"]  # (N, nt, nx[, ny])
                shape = tuple(int(s) for s in tensor.shape[1:])
                grids = {"t": _read_grid(f, "t-coordinate", shape[0], self.path)}
                axes = ("t", "x", "y", "z")[: len(shape)]
                for axis, n in zip(axes[1:], shape[1:], strict=True):
                    grids[axis] = _read_grid(f, f"{axis}-coordinate", n, self.path)
                available = int(tensor.shape[0])
            else:
                keys = _sample_keys(f)
                first = f[keys[0]]
                data_shape = tuple(int(s) for s in first["data"].shape)  # (nt, nx, 1)
                shape = data_shape[:-1] if data_shape[-1] == 1 else data_shape
                axes = ("t", "x", "y", "z")[: len(shape)]
                grids = {
                    "t": _read_grid(first, "grid/t", shape[0], f"{self.path} sample {keys[0]}"),
                    "x": _read_grid(first, "grid/x", shape[1], f"{self.path} sample {keys[0]}"),
                }
                available = len(keys)
        return SourceInfo(
            pde=self.pde,
            parameters=self.pde_parameters(),
            fields={self.field_name: FieldInfo(shape=shape, axes=axes)},
            grids=grids,
            available=available,
            details={"layout": layout, "path": self.path},
        )

    def samples(self, ids: list[int], seed: int) -> Iterator[Sample]:
        name, params = self.path.rsplit("/", 1)[-1], self.pde_parameters()
        with self._open() as f:
            if _layout(f, self.path) == "tensor":
                tensor = f["tensor"]
                for i in ids:
                    yield Sample(
                        i,
                        f"{name}#tensor[{i}]",
                        dict(params),
                        {self.field_name: np.asarray(tensor[i], dtype=np.float64)},
                    )
                return
            keys = _sample_keys(f)
            reference = {axis: np.asarray(f[keys[0]][f"grid/{axis}"]) for axis in ("t", "x")}
            for i in ids:
                group = f[keys[i]]
                where = f"{name} sample {keys[i]}"
                for axis, ref in reference.items():
                    grid = np.asarray(group[f"grid/{axis}"])
                    check_grid(axis, grid, where)
                    if grid.shape != ref.shape or not np.allclose(grid, ref):
                        raise BadSample(f"{where}: grid {axis!r} differs from sample {keys[0]}")
                data = np.asarray(group["data"], dtype=np.float64)  # (nt, nx, 1)
                if data.ndim >= 1 and data.shape[-1] == 1:
                    data = data[..., 0]
                yield Sample(i, f"{name}#{keys[i]}", dict(params), {self.field_name: data})


def _layout(f, path: str) -> str:
    if "tensor" in f:
        return "tensor"
    if any(_is_sample_group(f, k) for k in f.keys()):
        return "per-sample"
    raise UserError(
        f"ingest.path: {path}: not a PDEBench file (expected a 'tensor' dataset or groups "
        f"'0000', '0001', ... each holding 'data', 'grid/x', 'grid/t')"
    )


def _is_sample_group(f, key: str) -> bool:
    import h5py

    return key.isdigit() and isinstance(f[key], h5py.Group) and "data" in f[key]


def _sample_keys(f) -> list[str]:
    return sorted((k for k in f.keys() if _is_sample_group(f, k)), key=int)


def _read_grid(node, key: str, n: int, where: str) -> list[float]:
    if key not in node:
        raise BadSample(f"{where}: grid {key!r} missing")
    grid = np.asarray(node[key], dtype=np.float64).ravel()
    # PDEBench stores n + 1 time coordinates for n saved steps in some files.
    if grid.size == n + 1:
        grid = grid[:n]
    if grid.size != n:
        raise BadSample(f"{where}: grid {key!r} has {grid.size} points, the data has {n}")
    check_grid(key, grid, where)
    return grid.tolist()
