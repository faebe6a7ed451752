"""Ingestion of PDEBench HDF5 files in both layouts, and bad samples."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from flows.datasets import open_dataset
from flows.errors import UserError
from flows.preprocess import PreprocessSpec, run_preprocess
from flows.sources import BadSample
from flows.storage import Storage
from tests.pdebench_files import per_sample_file, tensor_file


def spec_for(path, **extra) -> PreprocessSpec:
    data = {
        "name": "ingested",
        "test_fraction": 0.2,
        "samples_per_task": 2,
        "ingest": {"path": str(path)},
        **extra,
    }
    return PreprocessSpec.model_validate(data)


def ingest(spec, root, dask_address):
    return run_preprocess(spec, Storage.at(str(root)), dask_address=dask_address)


@pytest.mark.parametrize("layout", ["per-sample", "tensor"])
def test_both_layouts_round_trip(tmp_path, dask_address, layout):
    path = tmp_path / f"{layout}.h5"
    truth = per_sample_file(path) if layout == "per-sample" else tensor_file(path)
    result = ingest(spec_for(path), tmp_path / "store", dask_address)
    m = result.manifest
    assert m.source["layout"] == layout
    assert m.fields["u"].shape == list(truth.shape[1:])
    assert len(m.grids["t"]) == truth.shape[1]  # trailing t-coordinate dropped
    ds = open_dataset(result.folder, verify=True)
    train, test = ds.arrays("train"), ds.arrays("test")
    ids = np.concatenate([train["sample_id"], test["sample_id"]])
    values = np.concatenate([train["u"], test["u"]])
    np.testing.assert_array_equal(values[np.argsort(ids)], truth)
    assert len(test["sample_id"]) == round(0.2 * len(truth))
    np.testing.assert_allclose(ds.statistics("u")["mean"], train["u"].astype(float).mean())
    # The file records no PDE parameters: PDEBench's, in the manifest and on every row.
    pdebench = {"diffusivity": 5e-4, "porosity": 0.29, "bulk_density": 2880.0,
                "freundlich_k": 3.5e-4, "freundlich_exponent": 0.874}  # fmt: skip
    assert m.pde == {"name": "diffusion-sorption", "parameters": pdebench}
    rows = ds.read_shard(ds.manifest.splits["test"].shards[0]).column("parameters").to_pylist()
    assert rows and all(dict(row) == pdebench for row in rows)


def test_given_parameters_are_recorded_and_checked(tmp_path, dask_address):
    path = tmp_path / "p.h5"
    tensor_file(path)
    spec = spec_for(path, ingest={"path": str(path), "parameters": {"porosity": 0.3}})
    m = ingest(spec, tmp_path / "store", dask_address).manifest
    assert m.pde["parameters"]["porosity"] == 0.3
    assert m.pde["parameters"]["diffusivity"] == 5e-4
    with pytest.raises(ValueError, match="parameters.porosty: diffusion-sorption has no"):
        spec_for(path, ingest={"path": str(path), "parameters": {"porosty": 0.3}})
    other = {"path": str(path), "pde": "burgers", "parameters": {"nu": 0.01}}
    assert spec_for(path, ingest=other).ingest.describe().parameters == {"nu": 0.01}


def test_nan_sample_is_named_and_never_written(tmp_path, dask_address):
    path = tmp_path / "bad.h5"
    per_sample_file(path)
    with h5py.File(path, "r+") as f:
        f["0003/data"][1, 2, 0] = np.nan
    with pytest.raises(BadSample, match=r"bad.h5#0003 \(sample 3\): field 'u' has 1 NaN"):
        ingest(spec_for(path), tmp_path / "store", dask_address)
    store = Storage.at(str(tmp_path / "store"))
    assert not store.exists(store.join("datasets/ingested/v1/manifest.json"))

    result = ingest(spec_for(path, on_bad_sample="skip"), tmp_path / "skip", dask_address)
    assert [s["sample_id"] for s in result.manifest.skipped] == [3]
    ds = open_dataset(result.folder)
    all_ids = np.concatenate([ds.arrays(s)["sample_id"] for s in ("train", "test")])
    assert 3 not in all_ids and len(all_ids) == 5


def test_non_monotone_grid_is_a_user_error(tmp_path, dask_address):
    path = tmp_path / "grid.h5"
    per_sample_file(path)
    with h5py.File(path, "r+") as f:
        f["0002/grid/x"][3] = f["0002/grid/x"][1]
    with pytest.raises(BadSample, match=r"grid.h5#0002|grid.h5 sample 0002.*not strictly"):
        ingest(spec_for(path), tmp_path / "store", dask_address)


def test_not_a_pdebench_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("something", data=np.zeros(3))
    with pytest.raises(UserError, match="not a PDEBench file"):
        spec_for(path).ingest.describe()
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(UserError, match="not an HDF5 file"):
        spec_for(tmp_path / "text.h5").ingest.describe()
    with pytest.raises(UserError, match="file not found"):
        spec_for(tmp_path / "none.h5").ingest.describe()
    with pytest.raises(UserError, match="a folder, not an HDF5 file"):
        spec_for(tmp_path).ingest.describe()


def test_more_samples_than_the_file_holds(tmp_path, dask_address):
    path = tmp_path / "few.h5"
    tensor_file(path, n=4)
    with pytest.raises(UserError, match="10 requested but .* holds 4"):
        ingest(spec_for(path, samples=10), tmp_path / "store", dask_address)
