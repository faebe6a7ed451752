"""The preprocess job end to end: simulate, publish, read back, resume, detect corruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from flows.datasets import open_dataset
from flows.errors import JobFailure, UserError
from flows.preprocess import PreprocessSpec, plan_shards, run_preprocess
from flows.storage import Storage

DS = {
    "name": "ds",
    "samples": 10,
    "test_fraction": 0.2,
    "samples_per_task": 3,
    "simulation": {"pde": "diffusion-sorption", "nx": 64, "nt": 11, "t_end": 100.0},
}
NS = {
    "name": "ns",
    "samples": 4,
    "test_fraction": 0.25,
    "samples_per_task": 2,
    "simulation": {"pde": "navier-stokes", "resolution": 32, "t_end": 0.5, "nt": 5},
}


def build(data, root, dask_address, **changes):
    spec = PreprocessSpec.model_validate({**data, **changes})
    return run_preprocess(spec, Storage.at(str(root)), dask_address=dask_address)


def test_plan_keeps_train_and_test_apart():
    tasks = plan_shards(10, 0.2, 3)
    assert [(t.split, t.sample_ids) for t in tasks] == [
        ("train", [0, 1, 2]),
        ("train", [3, 4, 5]),
        ("train", [6, 7]),
        ("test", [8, 9]),
    ]
    assert plan_shards(5, 0.01, 8)[-1].sample_ids == [4]  # any test fraction keeps one
    with pytest.raises(UserError, match="leaves no training samples"):
        plan_shards(2, 0.9, 1)


def test_diffusion_sorption_data_set(tmp_path, dask_address):
    result = build(DS, tmp_path, dask_address)
    m = result.manifest
    assert (m.splits["train"].rows, m.splits["test"].rows) == (8, 2)
    assert [s.path for s in m.splits["train"].shards] == [
        "train/part-00000.parquet",
        "train/part-00001.parquet",
        "train/part-00002.parquet",
    ]
    assert m.fields["u"].shape == [11, 64] and m.fields["u"].axes == ["t", "x"]
    assert len(m.grids["x"]) == 64 and m.grids["t"][-1] == 100.0
    assert m.pde["name"] == "diffusion-sorption" and m.pde["parameters"]["porosity"] == 0.29
    assert "fixed_shape_tensor" in m.schema_ or "extension" in m.schema_
    assert not Storage.at(result.folder).exists(result.folder + "/_work")

    ds = open_dataset(result.folder, verify=True)
    train = ds.arrays("train")
    u = train["u"].astype(np.float64)  # (8, 11, 64)
    assert list(train["sample_id"]) == list(range(8))
    # Reduced statistics equal those of the stored values.
    stats = ds.statistics("u")
    assert stats["mean"] == pytest.approx(u.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(u.std(), rel=1e-9)
    assert (stats["min"], stats["max"]) == (u.min(), u.max())
    # The physics: the left boundary feeds concentration 1 in; initial data is one
    # U(0, 0.2) value per sample (PDEBench's generator).
    assert np.all((u[:, 0] >= 0) & (u[:, 0] <= 0.2))
    assert np.all(u[:, 0] == u[:, 0, :1]) and len(np.unique(u[:, 0, 0])) == 8
    assert u[:, -1, 0].mean() > u[:, 0, 0].mean()

    # Same samples whatever the chunking: each sample has its own seed.
    other = build(DS, tmp_path / "other", dask_address, samples_per_task=5)
    np.testing.assert_array_equal(open_dataset(other.folder).arrays("train")["u"], train["u"])


def test_batches_stream_normalised_torch_tensors(tmp_path, dask_address):
    import torch

    ds = open_dataset(build(DS, tmp_path, dask_address).folder)
    batches = list(ds.batches("train", batch_size=3, normalize=True))
    assert [len(b["sample_id"]) for b in batches] == [3, 3, 2]
    assert isinstance(batches[0]["u"], torch.Tensor) and batches[0]["u"].shape == (3, 11, 64)
    u = torch.cat([b["u"] for b in batches]).double()
    assert abs(u.mean().item()) < 1e-5 and u.std(unbiased=False).item() == pytest.approx(1, 1e-4)
    shuffled = [b["sample_id"].tolist() for b in ds.batches("train", 3, shuffle=True, seed=1)]
    flat = sum(shuffled, [])
    assert sorted(flat) == list(range(8)) and flat != list(range(8))
    again = [b["sample_id"].tolist() for b in ds.batches("train", 3, shuffle=True, seed=1)]
    assert again == shuffled


def test_navier_stokes_data_set(tmp_path, dask_address):
    result = build(NS, tmp_path, dask_address)
    m = result.manifest
    assert m.fields["vorticity"].shape == [5, 32, 32]
    w = open_dataset(result.folder).arrays("train")["vorticity"].astype(np.float64)
    # Vorticity of a periodic flow has zero mean at every time; enstrophy only decays.
    assert np.abs(w.mean(axis=(2, 3))).max() < 1e-5
    z = (w**2).mean(axis=(2, 3))  # (samples, nt)
    assert np.all(np.diff(z, axis=1) <= 1e-6 * z[:, :1])


def test_republish_same_spec_is_a_no_op_and_other_spec_is_refused(tmp_path, dask_address):
    first = build(DS, tmp_path, dask_address)
    again = build(DS, tmp_path, dask_address)
    assert again.already_published and again.manifest.created == first.manifest.created
    with pytest.raises(UserError, match="already published from a different spec.*version=v2"):
        build(DS, tmp_path, dask_address, samples=12)


def test_corrupt_shard_is_detected(tmp_path, dask_address):
    result = build(DS, tmp_path, dask_address)
    shard = tmp_path / "datasets/ds/v1/train/part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = open_dataset(result.folder)
    with pytest.raises(JobFailure, match="part-00001.parquet: checksum mismatch"):
        ds.verify()
    with pytest.raises(JobFailure, match="checksum mismatch"):
        list(ds.batches("train", batch_size=4))
    shard.unlink()
    with pytest.raises(JobFailure, match="part-00001.parquet: shard listed in the manifest is"):
        ds.arrays("train")


def test_a_version_without_manifest_is_refused(tmp_path):
    (tmp_path / "datasets/ds/v1/train").mkdir(parents=True)
    with pytest.raises(UserError, match="not found"):
        open_dataset("ds", storage=Storage.at(str(tmp_path)))
    with pytest.raises(UserError, match="no manifest.json"):
        open_dataset(str(tmp_path / "datasets/ds/v1"))


SLOW_DS = """
name: slow
samples: 24
test_fraction: 0.125
samples_per_task: 1
simulation: {pde: diffusion-sorption, nx: 512, nt: 41}
"""


@pytest.mark.parametrize("stop", ["killed", "terminated"])
def test_killed_job_leaves_nothing_readable_and_resumes(tmp_path, dask_address, stop):
    """SIGKILL of the driver and its workers (a lost machine), or SIGTERM of the driver (a
    stopped job, a deleted pod: it stops as Ctrl-C does, with exit 143)."""
    spec = tmp_path / "slow.yaml"
    spec.write_text(SLOW_DS)
    env = {
        **os.environ,
        "PHYSFLOW_HOME": str(tmp_path / "home"),
        "PHYSFLOW_STORAGE": str(tmp_path / "store"),
    }
    cmd = [sys.executable, "-m", "flows.cli", "preprocess", str(spec), "--workers", "2"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    work = tmp_path / "store/datasets/slow/v1/_work"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(work.glob("*.json"))) < 3:
        assert proc.poll() is None, "job finished before it could be killed"
        time.sleep(0.05)
    if stop == "killed":
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Dask workers
        proc.wait(30)
    else:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 143, stderr
        assert stderr.strip().splitlines()[-1] == (
            "terminated: slow v1 was not published; finished shards are kept, and the same "
            "command resumes from them"
        )
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("preprocess").experiment_id])
        assert run.info.status == "KILLED"
    done = len(list(work.glob("*.json")))
    assert 3 <= done < 24
    store = Storage.at(str(tmp_path / "store"))
    with pytest.raises(UserError):
        open_dataset("slow", storage=store)

    from flows.spec import load_spec

    result = run_preprocess(load_spec(PreprocessSpec, spec), store, dask_address=dask_address)
    assert result.shards_resumed >= done  # every sidecar vouches for a whole shard
    assert result.shards_resumed + result.shards_written == 24
    fresh = build(
        PreprocessSpec.model_validate(__import__("yaml").safe_load(SLOW_DS)).resolved(),
        tmp_path / "fresh",
        dask_address,
    )
    a = open_dataset("slow", storage=store, verify=True).arrays("train")["u"]
    b = open_dataset(fresh.folder).arrays("train")["u"]
    np.testing.assert_array_equal(a, b)
