"""The cluster path on real services: data sets on SeaweedFS S3, runs in an MLflow server."""

from __future__ import annotations

import json

import mlflow
import numpy as np
from typer.testing import CliRunner

from flows.cli import app
from flows.datasets import list_datasets, open_dataset
from flows.storage import Storage

SPEC = """
name: ds-s3
samples: 6
samples_per_task: 2
test_fraction: 0.2
simulation: {pde: diffusion-sorption, nx: 32, nt: 6, t_end: 50.0}
"""


def test_preprocess_to_s3_tracked_by_mlflow_server(
    home, tmp_path, s3_env, mlflow_server, dask_address, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    spec = tmp_path / "s3.yaml"
    spec.write_text(SPEC)
    runner = CliRunner()
    result = runner.invoke(app, ["preprocess", str(spec), "--dask-address", dask_address])
    assert result.exit_code == 0, result.output
    assert f"at   {s3_env}/datasets/ds-s3/v1" in result.output
    assert not (home / "datasets").exists()  # nothing went to the local folder

    store = Storage.from_env()
    assert [m.name for m in list_datasets(store)] == ["ds-s3"]
    ds = open_dataset("ds-s3", verify=True)
    assert ds.folder.url.startswith("s3://")
    u = ds.arrays("train")["u"]
    assert u.shape == (5, 6, 32) and np.isfinite(u).all()

    # The MLflow server recorded the run, and its artifacts landed in the S3 store.
    mlflow.set_tracking_uri(mlflow_server.url)
    run = mlflow.search_runs(experiment_names=["preprocess"], output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["samples"] == 6 and run.data.metrics["bytes"] > 0
    assert run.data.params["simulation.nx"] == "32"
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"manifest.json", "trajectories.png", "spec.yaml"} <= names
    manifest = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/manifest.json"))
    assert manifest["spec_digest"] == ds.manifest.spec_digest
    s3 = store.fs
    assert s3.find("physflow-test/mlartifacts"), "artifacts were not proxied to S3"

    listed = runner.invoke(app, ["runs"])
    assert listed.exit_code == 0 and "ds-s3-v1" in listed.output


def test_s3_mistakes_are_user_errors(home, tmp_path, s3, s3_env, monkeypatch, dask_address):
    spec = tmp_path / "s3.yaml"
    spec.write_text(SPEC)
    runner = CliRunner()
    monkeypatch.setenv("PHYSFLOW_STORAGE", "s3://no-such-bucket/x")
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 2, result.output
    assert "bucket 'no-such-bucket' does not exist" in result.output
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("PHYSFLOW_STORAGE", s3_env)
    result = runner.invoke(app, ["datasets", "show", "x"])
    assert result.exit_code == 2, result.output
    assert "access denied" in result.output and "Traceback" not in result.output
