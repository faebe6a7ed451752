"""On a real local Ray: the evaluator pool (asynchronous hand-out with uneven evaluation
times, a killed actor, a failing evaluation), and `physflow nas` end to end with Ray
evaluators, S3 storage and an MLflow server, then `physflow nas export`."""

from __future__ import annotations

import csv
import io
import json

import mlflow
import pytest
import torch
from typer.testing import CliRunner

from actors.nas import ElasticMLP, EvaluatorPool, SyntheticEvaluator, digits_splits, load_supernet
from flows.cli import app
from flows.nas import SearchFolder
from flows.runtime import start_local_ray
from flows.storage import Storage

ray = pytest.importorskip("ray")
runner = CliRunner()

SPEC = """
name: digits-tiny
supernet:
  kind: mlp-digits
  max_depth: 2
  widths: [8, 16, 32]
  training: {epochs: 2}
objectives: [error, macs]
strategy: {kind: linas, population: 6, batch: 3, inner_generations: 5}
budget: 10
evaluators: {executor: ray, actors: 2, cpus_per_actor: 0.5}
"""


def physflow(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def local_ray():
    # the synthetic evaluations sleep: four actors fit on two cores
    start_local_ray(4)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(local_ray):
    """Two actors of synthetic evaluations, shared: starting actors is the slow part."""
    pool = EvaluatorPool(SyntheticEvaluator, None, actors=2, cpus_per_actor=0.5)
    yield pool
    pool.close()


def drain(pool: EvaluatorPool, tasks: list[dict]) -> list:
    pool.reset_statistics()
    for i, config in enumerate(tasks):
        pool.submit((i,), config)
    return [pool.next_done() for _ in tasks]


def overlapping(intervals, outer) -> int:
    """How many evaluations on other actors ran (partly) while `outer` ran."""
    name, start, end = outer
    return sum(1 for n, s, e in intervals if n != name and s < end and e > start)


def test_async_pool_keeps_every_actor_busy_despite_a_straggler(pool):
    tasks = [{"sleep_ms": 900}] + [{"sleep_ms": 100}] * 6
    found = {}
    for mode in ("async", "sync"):
        pool.mode = mode
        try:
            outcomes = drain(pool, tasks)
        finally:
            pool.mode = "async"
        assert all(o.result is not None for o in outcomes)
        straggler = max(pool.intervals, key=lambda i: i[2] - i[1])
        found[mode] = (overlapping(pool.intervals, straggler), pool.efficiency())
    # asynchronous: the other actor works through every short evaluation meanwhile;
    # synchronous rounds: it does one, then waits for the round to end
    assert found["async"][0] == 6
    assert found["sync"][0] == 1
    assert found["async"][1] > found["sync"][1]


def test_a_failing_evaluation_is_retried_once_elsewhere_then_recorded(pool):
    outcomes = drain(pool, [{"sleep_ms": 50}, {"fail": 1}, {"sleep_ms": 50}])
    failed = [o for o in outcomes if o.result is None]
    assert len(failed) == 1 and failed[0].attempts == 2
    assert len(set(failed[0].failed_on)) == 2  # the retry ran on the other actor
    assert "synthetic failure" in failed[0].error
    assert sum(o.result is not None for o in outcomes) == 2


def test_a_killed_actor_is_replaced_and_its_evaluation_retried(pool):
    pool.reset_statistics()
    restarts = pool.restarts
    tasks = [{"sleep_ms": 400}] * 6
    for i, config in enumerate(tasks):
        pool.submit((i,), config)
    outcomes = [pool.next_done()]
    ((busy_index, _),) = pool.running.values()
    victim = pool.actors[busy_index][0]
    ray.kill(ray.get_actor(victim))
    outcomes += [pool.next_done() for _ in range(5)]
    assert sorted(o.key for o in outcomes) == [(i,) for i in range(6)]
    assert all(o.result == {"sleep_ms": 400.0} for o in outcomes)
    retried = [o for o in outcomes if o.attempts == 2]
    assert len(retried) == 1 and retried[0].actor != victim
    assert pool.restarts == restarts + 1 and victim not in pool.names


def test_search_with_ray_evaluators_on_s3_and_an_mlflow_server(
    local_ray, home, tmp_path, s3_env, mlflow_server, monkeypatch
):
    spec = tmp_path / "nas.yaml"
    spec.write_text(SPEC)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    result = physflow("nas", spec)
    assert result.exit_code == 0, result.output
    assert "validated 10 sub-networks" in result.output
    assert not (home / "runs").exists()  # everything went to S3

    store = Storage.from_env()
    folder = SearchFolder.of(store, "digits-tiny")
    rows = folder.rows()
    space = ElasticMLP(2, (8, 16, 32)).space
    assert [r.index for r in rows] == list(range(1, 11))
    assert len({space.key(r.config) for r in rows}) == 10
    assert all(r.actor.startswith("physflow-nas-") for r in rows)

    mlflow.set_tracking_uri(mlflow_server.url)
    run_id = folder.state()["run_id"]
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "hypervolume")
    assert [m.step for m in history] == list(range(1, 11))
    hv = [m.value for m in history]
    assert all(b >= a for a, b in zip(hv, hv[1:], strict=False)) and 0 < hv[-1] <= 1
    assert [m.step for m in client.get_metric_history(run_id, "supernet_loss")] == [1, 2]
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"pareto.png", "front.csv", "results.csv", "predictors.json", "supernet"} <= names
    front_csv = client.download_artifacts(run_id, "front.csv", str(tmp_path))
    with open(front_csv) as f:
        front = list(csv.DictReader(f))
    assert list(front[0]) == ["pick", "error", "macs", "config"] and front[0]["pick"] == "1"
    with open(client.download_artifacts(run_id, "results.csv", str(tmp_path))) as f:
        results = {int(r["index"]): r for r in csv.DictReader(f)}
    for row in rows:  # every measure as measured, the failure column apart
        assert float(results[row.index]["error"]) == pytest.approx(row.measures["error"])
        assert results[row.index]["failure"] == (row.error or "")

    out = tmp_path / "pick1.pt"
    exported = physflow("nas", "export", run_id[:8], "--pick", 1, "--out", out)
    assert exported.exit_code == 0, exported.output
    module = torch.load(out, weights_only=False)
    checkpoint = io.BytesIO(store.read_bytes(folder.state()["supernet"]))
    net = load_supernet(torch.load(checkpoint, weights_only=False))
    x = digits_splits(0)["test"][0]
    with torch.no_grad():
        activated = net.activate(json.loads(front[0]["config"]))(x)
        torch.testing.assert_close(module(x), activated, rtol=0, atol=1e-6)
    assert "export" in {a.path for a in client.list_artifacts(run_id)}

    assert physflow("nas", "export", run_id, "--pick", 99).exit_code == 2
    for where, message in [(tmp_path, "a folder; give a file name"),
                           (tmp_path / "none" / "x.pt", "does not exist")]:  # fmt: skip
        refused = physflow("nas", "export", run_id, "--pick", 1, "--out", where)
        assert refused.exit_code == 2 and message in refused.output, refused.output
        assert "Traceback" not in refused.output
