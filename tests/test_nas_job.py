"""`physflow nas` through the CLI, in-process evaluators: resume after the search process is
killed, the spec mistakes a user can make, the command group. (Ray, S3 and the MLflow server:
test_nas_ray.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from actors.nas import ElasticMLP, RandomSearch
from flows.cli import app
from flows.nas import NASSpec, SearchFolder
from flows.storage import Storage

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
evaluators: {executor: local}
"""

# In-process evaluation, each slowed by timing it 400 times: slow enough to be killed midway.
RESUME_SPEC = """
name: digits-resume
supernet:
  kind: mlp-digits
  max_depth: 2
  widths: [8, 16, 32]
  training: {epochs: 1}
objectives: [error, latency_ms]
strategy: {kind: random, seed: 5}
budget: 12
evaluators:
  executor: local
  latency: {batch_size: 64, warmup: 20, repeats: 400}
"""


def physflow(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "nas.yaml"
    path.write_text(SPEC)
    return path


def test_resume_after_the_search_is_killed_validates_nothing_twice(home, tmp_path):
    path = tmp_path / "resume.yaml"
    path.write_text(RESUME_SPEC)
    results = home / "runs/digits-resume/nas/results/part-00000.jsonl"
    search = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "nas", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and search.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 3:
            search.kill()
            break
        time.sleep(0.02)
    search.wait()
    assert search.returncode == -9, "the search ended before it could be killed"
    before = [json.loads(line) for line in results.read_text().splitlines()]
    assert 3 <= len(before) < 12

    resumed = physflow("nas", path, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"validated 12 sub-networks, {12 - len(before)} new" in resumed.output
    rows = SearchFolder.of(Storage.from_env(), "digits-resume").rows()
    space = ElasticMLP(2, (8, 16, 32)).space
    keys = [space.key(r.config) for r in rows]
    assert len(keys) == len(set(keys)) == 12
    assert [r.to_json() for r in rows[: len(before)]] == before  # kept as they were
    assert len({r.session for r in rows[len(before) :]}) == 1
    assert rows[-1].session != before[0]["session"]
    # the resumed strategy replayed the stored rows and asked what it would have asked
    strategy = RandomSearch(space, ["error", "latency_ms"], seed=5)
    expected = [space.key(c) for c in strategy.ask() + strategy.ask()][:12]
    assert keys == expected
    # nothing left: the run's figures stay those of the work done; a lower budget is refused
    again = physflow("nas", path, "--resume")
    assert again.exit_code == 0 and "validated 12 sub-networks, 0 new" in again.output
    import mlflow

    from flows.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    state = SearchFolder.of(Storage.from_env(), "digits-resume").state()
    metrics = mlflow.get_run(state["run_id"]).data.metrics
    assert metrics["validations_new"] == 12 - len(before) and metrics["pool_efficiency"] > 0
    lower = physflow("nas", path, "--resume", "--set", "budget=5")
    assert lower.exit_code == 2 and "budget 5 is below the 12 validations" in lower.output


def test_sigterm_stops_a_ray_search_as_ctrl_c_does(home, tmp_path):
    """`physflow stop` of a submitted search: exit 143, a one-line message, the run KILLED,
    the finished validations kept for --resume (Ray's evaluators; its waits hand the
    signal's raise back as a plain interrupt, and its handlers would dump stack traces)."""
    import signal

    import mlflow

    path = tmp_path / "term.yaml"
    ray_evaluators = "evaluators:\n  executor: ray\n  actors: 2\n  cpus_per_actor: 1\n"
    path.write_text(RESUME_SPEC.replace("name: digits-resume", "name: digits-term")
                    .replace("evaluators:\n  executor: local\n", ray_evaluators))  # fmt: skip
    results = home / "runs/digits-term/nas/results/part-00000.jsonl"
    search = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "nas", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and search.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 3:
            search.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, stderr = search.communicate(timeout=60)
    assert search.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("terminated: every finished validation is kept; continue with: ")
    assert last.endswith("--resume"), stderr
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr
    assert "Failed to report actor" not in stderr, stderr
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["nas"], output_format="list")
    assert run.info.status == "KILLED"
    kept = len(results.read_text().splitlines())
    assert 3 <= kept < 12

    resumed = physflow("nas", path, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"validated 12 sub-networks, {12 - kept} new" in resumed.output


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("space.width_7=[8]", "space.width_7: unknown elastic variable"),
        ("space.depth=[]", "space.depth: empty choice set"),
        ("budget=5", "budget 5: below strategy.population 6"),
        ("space.depth=[1]", "budget 10: the space holds 3 sub-networks; a budget of 3"),
        ("objectives=[rel_l2, macs]", "objectives.0: 'rel_l2' cannot be measured"),
        ("strategy.kind=grid", "strategy.kind: Input should be 'random', 'nsga2' or 'linas'"),
    ],
)
def test_spec_mistakes_are_one_line_user_errors(home, spec, override, message):
    result = physflow("nas", spec, "--set", override)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (home / "runs").exists()


def test_a_super_network_checkpoint_that_is_not_one_is_a_user_error(home, spec, tmp_path):
    garbage = tmp_path / "supernet.pt"
    garbage.write_bytes(b"not a checkpoint")
    result = physflow("nas", spec, "--set", f"supernet.checkpoint={garbage}")
    assert result.exit_code == 2, result.output
    assert f"{garbage}: not a torch checkpoint" in result.output
    assert "Traceback" not in result.output


def test_nas_group_help_and_spec_parsing():
    assert "export" in physflow("nas", "--help").output
    assert "--pick" in physflow("nas", "export", "--help").output
    assert physflow("nas", "missing.yaml").output.strip() == (
        "error: missing.yaml: spec file not found"
    )
    spec = NASSpec.model_validate(
        {"name": "x", "supernet": {"kind": "fno", "dataset": "ds"}, "budget": 60}
    )
    assert spec.supernet.modes == [4, 6, 8] and spec.strategy.kind == "linas"
    assert np.isclose(spec.supernet.training.lr, 3e-3)


def test_interrupted_on_the_super_network_the_hint_starts_again(home, spec, monkeypatch):
    """Before the search keeps anything, --resume would find nothing: the hint says so."""
    import flows.nas

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.nas, "run_nas", stopped)
    result = physflow("nas", spec, "--set", "budget=12")
    assert result.exit_code == 130
    assert "nothing kept; start again with: physflow nas" in result.output
    assert "--set budget=12" in result.output and "--resume" not in result.output


def test_fno_sub_networks_are_validated_on_held_out_training_samples(home, dask_address):
    """The search never sees the data set's test split: a fifth of the training samples,
    drawn with the evaluators' seed, is held out from the super-network's training and
    validates the sub-networks."""
    import torch

    from flows.datasets import open_dataset
    from flows.nas import open_problem
    from flows.preprocess import PreprocessSpec, run_preprocess

    simulation = {"pde": "diffusion-sorption", "nx": 16, "nt": 5, "t_end": 500.0}
    data = {"name": "ds-nas", "samples": 12, "test_fraction": 0.25, "samples_per_task": 6,
            "simulation": simulation}  # fmt: skip
    storage = Storage.from_env()
    run_preprocess(PreprocessSpec.model_validate(data), storage, dask_address=dask_address)
    spec = NASSpec.model_validate(
        {"name": "fno", "supernet": {"kind": "fno", "dataset": "ds-nas"}, "budget": 60}
    )
    problem = open_problem(spec, storage)
    arrays = open_dataset("ds-nas", storage=storage)
    train, test = (torch.as_tensor(arrays.arrays(s)["u"]).float() for s in ("train", "test"))
    fit, held = problem.train[1][:, 0], problem.validation[1][:, 0]
    assert (len(fit), len(held)) == (8, 1) and len(train) == 9

    def rows(a, b):  # which rows of b each row of a equals
        return [int(i) for x in a for i in range(len(b)) if torch.equal(x, b[i])]

    assert sorted(rows(fit, train) + rows(held, train)) == list(range(9))  # a split of train
    assert rows(held, test) == [] and rows(fit, test) == []
    again = open_problem(spec, storage).validation[1]
    assert torch.equal(again[:, 0], held)  # the evaluators' seed decides it
    other = open_problem(spec.model_copy(update={"evaluators": spec.evaluators.model_copy(
        update={"seed": 3})}), storage).validation[1]  # fmt: skip
    assert len(other) == 1
