"""Real services for the suite: a SeaweedFS S3 store, an MLflow server, a Dask cluster.

Each is started once per session on 127.0.0.1 and stopped at the end. Tests that need an
isolated embedded runtime use `home`, which points PHYSFLOW_HOME at a fresh folder.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from infra.services import start_mlflow, start_seaweedfs

S3_BUCKET = "physflow-test"
_CLEARED = (
    "PHYSFLOW_STORAGE",
    "MLFLOW_TRACKING_URI",
    "PHYSFLOW_DASK_ADDRESS",
    "DASK_SCHEDULER_ADDRESS",
    "PHYSFLOW_S3_ENDPOINT_URL",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No test sees the developer's cluster settings."""
    for var in _CLEARED:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh embedded runtime: storage and SQLite MLflow under tmp/.physflow."""
    root = tmp_path / ".physflow"
    monkeypatch.setenv("PHYSFLOW_HOME", str(root))
    monkeypatch.chdir(tmp_path)
    return root


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """SeaweedFS with credentials; its credentials are exported for s3fs, Dask and MLflow."""
    key, secret = "physflow-test", uuid.uuid4().hex
    service = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), key, secret, [S3_BUCKET])
    saved = {k: os.environ.get(k) for k in service.env}
    os.environ.update({k: v for k, v in service.env.items() if k.startswith("AWS_")})
    yield service
    service.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_env(s3, monkeypatch) -> str:
    """Storage on a fresh S3 prefix; returns its URL."""
    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:8]}"
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PHYSFLOW_STORAGE", url)
    return url


@pytest.fixture(scope="session")
def mlflow_server(s3, tmp_path_factory):
    """A real `mlflow server`, SQLite backend, artifacts proxied to the S3 store."""
    service = start_mlflow(
        tmp_path_factory.mktemp("mlflow"), f"s3://{S3_BUCKET}/mlartifacts", s3.env
    )
    yield service
    service.stop()


@pytest.fixture(scope="session")
def dask_address(s3):
    """A LocalCluster with 2 worker processes (started after S3 so workers see its creds)."""
    from flows.runtime import local_cluster

    with local_cluster(2) as cluster:
        yield cluster.scheduler_address
