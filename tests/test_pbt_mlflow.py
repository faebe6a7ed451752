"""A search with its checkpoints on S3 and its runs on a real `mlflow server` (artifacts
proxied to S3): nested runs, schedules, exploit records, lineage artifacts, and only the
checkpoints that someone may still load left in the bucket."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from flows.pbt import PbtSpec, run_pbt
from flows.runtime import start_local_ray
from flows.spec import load_spec
from flows.storage import Storage

TOY = Path(__file__).resolve().parents[1] / "configs" / "pbt-toy.yaml"


@pytest.fixture(scope="module")
def ray_with_s3_credentials(s3):
    """Ray started after the S3 store, so that member processes inherit its credentials."""
    import ray

    start_local_ray(2)
    yield
    ray.shutdown()


def test_search_on_s3_tracked_by_an_mlflow_server(
    home, s3_env, mlflow_server, ray_with_s3_credentials, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    spec = load_spec(PbtSpec, TOY, ["name=toy-s3", "steps_per_member=12"])
    result = run_pbt(spec)
    assert result.score > 0.39 and result.exploits > 0

    mlflow.set_tracking_uri(mlflow_server.url)
    client = mlflow.MlflowClient()
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["strategy"] == "pbt"
    assert parent.data.metrics["best_score"] == pytest.approx(result.score)
    members = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert len(members) == 4
    exploit_tags = 0
    for run in members:
        schedule = client.get_metric_history(run.info.run_id, "hp.h1")
        assert sorted(m.step for m in schedule) == list(range(1, 13))
        assert {"hp.h0", "hp.h1", "seed"} <= set(run.data.params)
        exploit_tags += sum(k.startswith("exploit.step-") for k in run.data.tags)
    assert exploit_tags == result.exploits
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"lineage.json", "lineage.png", "exploits.json"} <= names
    lineage = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/lineage.json")
    assert lineage["winner"]["member"] == result.winner
    assert len(lineage["exploits"]) == result.exploits

    root = Storage.from_env()
    assert root.url.startswith("s3://")
    state = root.read_json(root.join("pbt", "toy-s3", "state.json"))
    kept = set(state["latest"].values())
    assert all(root.exists(path) for path in kept)
    stored = {
        "s3://" + p.removeprefix("s3://")
        for p in root.fs.find(root.join("pbt", "toy-s3"))
        if p.endswith(".pkl")
    }
    assert stored == kept  # superseded checkpoints were deleted, needed ones kept
