"""The cluster path on real services: data sets on SeaweedFS S3, runs in an MLflow server."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
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


@pytest.mark.parametrize(
    ("credentials", "message"),
    [
        (False, "Unable to locate credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        (True, 'Could not connect to the endpoint URL: "http://127.0.0.1:9/'),
    ],
)
def test_an_s3_store_not_there_is_one_line(home, monkeypatch, credentials, message):
    """What a shell still set up for a stack that is down meets: a closed port, or no
    credentials at all. (botocore's errors are not OSErrors.)"""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "none"))
    if credentials:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "physflow")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("PHYSFLOW_STORAGE", "s3://physflow/data")
    monkeypatch.setenv("PHYSFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens
    result = CliRunner().invoke(app, ["datasets"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert lines[0].startswith("error: s3://physflow/data: cannot reach the S3 store at ")


def test_the_clusters_mlflow_command_serves_with_basic_auth(tmp_path):
    """The MLflow container's own start-up script from k8s/base/mlflow.yaml, run here with
    SQLite for PostgreSQL and a folder for the bucket, on loopback: it starts (its
    basic-auth app needs Flask-WTF, which `mlflow[auth]` brings), refuses a caller without
    credentials or with a wrong password, and lets the admin in with the Secret's
    password."""
    import base64
    import os
    import re
    import subprocess
    import sys
    import urllib.error
    import urllib.request
    from pathlib import Path

    import yaml

    from infra.services import free_port, wait_http

    docs = yaml.safe_load_all(Path("k8s/base/mlflow.yaml").read_text())
    deployment = next(d for d in docs if d and d.get("kind") == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    script, port = container["args"][0], free_port()
    for pattern, local in [
        (r'DB="[^"]*"', f'DB="sqlite:///{tmp_path}/mlflow.db"'),
        (r"/run/mlflow/auth\.ini", f"{tmp_path}/auth.ini"),
        (r"s3://physflow/mlartifacts", f"{tmp_path}/artifacts"),
        (r"--host 0\.0\.0\.0 --port 5000", f"--host 127.0.0.1 --port {port}"),
    ]:
        script, found = re.subn(pattern, local, script)
        assert found == 1, pattern  # the manifest still says what this test replaces
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env["MLFLOW_AUTH_CONFIG_PATH"] = f"{tmp_path}/auth.ini"
    secrets = {
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-secret-1",
        "MLFLOW_JOBS_PASSWORD": "jobs-secret-12",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
    }
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        ["/bin/sh", "-c", script], env={**os.environ, **env, **secrets, "PATH": path},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 120, server)

        def create(user: str | None, password: str | None, what: str = "experiments") -> int:
            body = {"name": f"by-{user}"} if what == "experiments" else {
                "username": f"by-{user}", "password": "a-password-123"}  # fmt: skip
            request = urllib.request.Request(
                f"{url}/api/2.0/mlflow/{what}/create",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            if user is not None:
                token = base64.b64encode(f"{user}:{password}".encode()).decode()
                request.add_header("Authorization", f"Basic {token}")
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        assert create(None, None) == 401
        assert create("admin", "wrong") == 401
        assert create("admin", secrets["MLFLOW_AUTH_ADMIN_PASSWORD"]) == 200
        # the jobs' user logs runs, but is no admin: it cannot make users
        jobs = ("physflow-jobs", secrets["MLFLOW_JOBS_PASSWORD"])
        assert create(*jobs) == 200
        assert create(*jobs, what="users") == 403
        assert create("admin", secrets["MLFLOW_AUTH_ADMIN_PASSWORD"], what="users") == 200
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
