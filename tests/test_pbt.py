"""Population-based training end to end on the paper's toy problem, on a real local Ray:
PBT against the other strategies, replay, exploit copying weights, a killed member, a
crashed and a hung member, a killed driver resumed, the CLI and its user errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.errors import UserError
from flows.pbt import PbtSpec, run_pbt
from flows.runtime import start_local_ray
from flows.spec import load_spec
from flows.storage import Storage

runner = CliRunner()
TOY = Path(__file__).resolve().parents[1] / "configs" / "pbt-toy.yaml"


@pytest.fixture(scope="module")
def ray_local():
    """One small local Ray for the module (not any cluster already on this machine)."""
    import ray

    yield start_local_ray(2)
    ray.shutdown()


def toy(*overrides: str) -> PbtSpec:
    return load_spec(PbtSpec, TOY, list(overrides))


def member_runs(result) -> dict[int, mlflow.entities.Run]:
    runs = mlflow.search_runs(
        experiment_names=[result.experiment],
        filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'",
        output_format="list",
    )
    return {int(r.data.tags["physflow.member"]): r for r in runs}


def history(run_id: str, key: str) -> dict[int, float]:
    values = mlflow.MlflowClient().get_metric_history(run_id, key)
    steps = [m.step for m in values]
    assert len(steps) == len(set(steps)), f"{key}: a step logged twice"
    return {m.step: m.value for m in values}


def test_pbt_beats_grid_explore_and_exploit_only_and_replays(home, ray_local, tmp_path):
    results = {
        s: run_pbt(toy(f"strategy={s}", f"name=toy-{s}"))
        for s in ("pbt", "grid", "explore_only", "exploit_only")
    }
    scores = {s: r.score for s, r in results.items()}
    assert scores["pbt"] >= 1.18, scores
    assert all(scores[s] < 1.18 for s in ("grid", "explore_only", "exploit_only")), scores

    pbt = results["pbt"]
    assert pbt.exploits > 0 and results["grid"].exploits == 0
    runs = member_runs(pbt)
    assert sorted(runs) == [0, 1, 2, 3]
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert sorted(history(run.info.run_id, "hp.h0")) == list(range(1, 41))
        assert sorted(history(run.info.run_id, "q")) == list(range(1, 41))
    tags = [k for r in runs.values() for k in r.data.tags if k.startswith("exploit.step-")]
    assert len(tags) == pbt.exploits
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(pbt.run_id)}
    assert {"lineage.json", "lineage.png", "exploits.json", "spec.yaml"} <= artifacts
    # the schedule over steps changes: explore moved h of some member
    assert any(len(set(history(r.info.run_id, "hp.h1").values())) > 2 for r in runs.values())

    # replay: the winner from the run id (CLI), another member from the lineage file
    replayed = runner.invoke(app, ["pbt", "replay", pbt.run_id[:8]])
    assert replayed.exit_code == 0, replayed.output
    assert f"replayed member {pbt.winner}" in replayed.output
    assert "difference 0)" in replayed.output
    path = tmp_path / "lineage.json"
    import json

    path.write_text(json.dumps(pbt.lineage))
    other = (pbt.winner + 1) % 4
    from flows.pbt_replay import replay

    again = replay(str(path), member=other)
    for text, message in [("{bad", "not a lineage.json (not JSON"), ("{}", "has 'spec' and")]:
        wrong = tmp_path / "wrong.json"
        wrong.write_text(text)
        refused = runner.invoke(app, ["pbt", "replay", str(wrong)])
        assert refused.exit_code == 2 and message in refused.output, refused.output
    assert again.score == again.recorded
    assert again.steps == 40 and again.segments == 20


def test_exploit_copies_weights_and_hyperparameters(home, ray_local):
    # not the symmetric pair of the paper: the two members' Q differ before the copy
    initial = "initial=[{h0: 1.0, h1: 0.0}, {h0: 0.0, h1: 0.5}]"
    result = run_pbt(toy("strategy=exploit_only", "population=2", initial, "name=toy-copy"))
    first = result.lineage["exploits"][0]
    runs = member_runs(result)
    m, donor, step = first["member"], first["donor"], first["step"]
    assert first["ops"] == {} and first["new"] != first["old"]  # exploit-only: a plain copy
    mine = history(runs[m].info.run_id, "loss")
    theirs = history(runs[donor].info.run_id, "loss")
    before = history(runs[m].info.run_id, "q")[step], history(runs[donor].info.run_id, "q")[step]
    assert before[0] != before[1]  # different weights before the copy...
    assert mine[step + 1] == theirs[step + 1]  # ...the same loss right after it
    assert (
        history(runs[m].info.run_id, "hp.h0")[step + 1]
        == history(runs[donor].info.run_id, "hp.h0")[step + 1]
    )


def test_three_members_on_two_cpus_all_run(home, ray_local):
    """Each gets 2/3 of a CPU: rounded to 0.6667 the three wanted 2.0001 CPUs of 2, and
    the third member waited for ever (the search with it)."""
    result = run_pbt(toy("population=3", "steps_per_member=8", "name=toy-three",
                         "initial=[{h0: 1.0, h1: 0.0}]"))  # fmt: skip
    assert len(member_runs(result)) == 3
    assert result.members_failed == 0 and result.steps_trained == 3 * 8
    # its experiment is named after it, not "pbt...": its runs still show a search's metrics
    listed = runner.invoke(app, ["runs", "-e", "toy-three"])
    assert listed.exit_code == 0 and "best_score" in listed.output, listed.output


def test_asynchronous_pbt_with_tournaments_replays_from_checkpoints(home, ray_local, tmp_path):
    # Members of unequal speed (h1 = 0.5 trains its coordinate at half the rate): with the
    # symmetric start all four have the same Q at the same step, and whether a tournament
    # ever finds a better rival then depends on which member the machine's load put ahead
    # (none did, once in ten runs under load).
    initial = "initial=[" + ", ".join(["{h0: 1.0, h1: 0.0}, {h0: 0.0, h1: 0.5}"] * 2) + "]"
    spec = toy("name=toy-async", "synchronous=false", "exploit.method=tournament",
               "steps_per_member=24", initial)  # fmt: skip
    result = run_pbt(spec)
    members = result.lineage["members"]
    assert all(m["status"] == "finished" and m["segments"][-1]["end"] == 24 for m in members)
    assert result.exploits > 0
    for e in result.lineage["exploits"]:  # a tournament copies only a better rival
        assert e["donor_score"] > e["score"]
        donor = members[e["donor"]]["segments"]
        assert e["donor_score"] in [s["score"] for s in donor if s["end"] == e["donor_step"]]
    import json

    from flows.pbt_replay import replay

    path = tmp_path / "lineage.json"
    path.write_text(json.dumps(result.lineage))
    for m in range(4):
        again = replay(str(path), member=m)
        assert again.score == again.recorded


def _kill_member(index: int, when: int, killed: list):
    import ray

    def progress(done: int, total: int, best) -> None:
        if done >= when and not killed:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
            victim = next(n for n in names if n.endswith(f"-member-{index}"))
            ray.kill(ray.get_actor(victim))
            killed.append(victim)

    return progress


def test_a_killed_member_restarts_from_its_last_checkpoint(home, ray_local):
    spec = toy("name=toy-calm", "options.step_seconds=0.01", "seed=3")
    calm = run_pbt(spec)
    killed: list[str] = []
    stormy = run_pbt(
        spec.model_copy(update={"name": "toy-stormy"}), progress=_kill_member(1, 40, killed)
    )
    assert killed
    record = stormy.lineage["members"][1]
    assert record["restarts"] == 1 and record["status"] == "finished"
    ends = [(s["start"], s["end"]) for s in record["segments"]]
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:], strict=False)) and ends[-1][1] == 40
    # nothing was lost: the same seed gives the same search, killed or not
    assert stormy.score == calm.score and stormy.winner == calm.winner
    assert [m["segments"][-1]["score"] for m in stormy.lineage["members"]] == [
        m["segments"][-1]["score"] for m in calm.lineage["members"]
    ]


FLAKY = '''
import os, time
from actors.pbt.toy import ToyTrainer


class Flaky(ToyTrainer):
    """Member seed 1 raises at step 5; member seed 2 hangs once at step 3."""

    def __init__(self, seed, marker):
        super().__init__(seed, lr=0.05)
        self.marker = marker

    def step(self, hparams):
        if self.seed == 1 and self.steps_ == 5:
            raise RuntimeError("boom: this member's trainer failed")
        if self.seed == 2 and self.steps_ == 3 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(600)
        return super().step(hparams)


def build(seed, options):
    return Flaky(seed, options["marker"])
'''


def test_crashed_and_hung_members_do_not_block_a_synchronous_population(home, ray_local, tmp_path):
    (tmp_path / "flaky_trainable.py").write_text(textwrap.dedent(FLAKY))
    spec = toy(
        "name=toy-flaky",
        "trainable=flaky_trainable:build",
        f"options={{marker: {tmp_path / 'hung-once'}}}",
        "faults.member_timeout_s=4",
        "steps_per_member=12",
    )
    result = run_pbt(spec)
    members = result.lineage["members"]
    assert members[1]["status"] == "failed" and result.members_failed == 1
    assert members[2]["status"] == "finished" and members[2]["restarts"] == 1
    assert all(members[m]["segments"][-1]["end"] == 12 for m in (0, 2, 3))
    runs = member_runs(result)
    assert runs[1].info.status == "FAILED" and "boom" in runs[1].data.tags["failure"]


def test_a_killed_driver_resumes_without_redoing_finished_steps(home, ray_local, tmp_path):
    spec_path = tmp_path / "resume.yaml"
    spec_path.write_text(TOY.read_text().replace("name: pbt-toy", "name: toy-resume"))
    sets = ["--set", "options.step_seconds=0.1"]
    env = {**os.environ, "RAY_ADDRESS": ray_local, "PHYSFLOW_HOME": str(home)}
    cli = Path(sys.executable).parent / "physflow"
    driver = subprocess.Popen(
        [str(cli), "pbt", str(spec_path), *sets],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    state = Storage.from_env().join("pbt", "toy-resume", "state.json")
    root = Storage.from_env()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if root.exists(state) and _step(root.read_json(state)) >= 8:
            break
        assert driver.poll() is None, driver.stdout.read().decode()
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    committed = _step(root.read_json(state))
    assert 8 <= committed < 40

    again = runner.invoke(app, ["pbt", str(spec_path), *sets])
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = runner.invoke(app, ["pbt", str(spec_path), *sets, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed from step {committed}" in resumed.output
    assert f"{4 * (40 - committed)} steps trained" in resumed.output  # none done twice
    final = root.read_json(state)
    assert _step(final) == 40
    parent = final["extra"]["parent_run_id"]
    runs = mlflow.search_runs(
        experiment_names=["toy-resume"],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
        output_format="list",
    )
    assert len(runs) == 4
    for run in runs:
        assert sorted(history(run.info.run_id, "q")) == list(range(1, 41))  # no step twice


def _member_runs(experiment: str) -> list:
    return [
        r for r in mlflow.search_runs(experiment_names=[experiment], output_format="list")
        if "mlflow.parentRunId" in r.data.tags
    ]  # fmt: skip


def test_a_terminated_search_keeps_its_state_and_ends_its_runs(home, ray_local, tmp_path):
    """SIGTERM (`physflow stop` of a submitted search, a deleted pod) stops a search as
    Ctrl-C does: exit 143, the committed state kept, the parent and member runs KILLED;
    before the first ready point nothing is kept, and the message says so."""
    env = {**os.environ, "RAY_ADDRESS": ray_local, "PHYSFLOW_HOME": str(home)}
    cli = Path(sys.executable).parent / "physflow"
    root = Storage.from_env()
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    for name, ready in (("toy-term", 2), ("toy-early", 40)):
        sets = ["--set", "options.step_seconds=0.1", "--set", f"name={name}",
                "--set", f"ready_interval_steps={ready}"]  # fmt: skip
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        driver = subprocess.Popen([str(cli), "pbt", str(TOY), *sets], env=env, cwd=tmp_path,
                                  **pipes)  # fmt: skip
        state = root.join("pbt", name, "state.json")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # toy-term: a committed round; toy-early: runs
            if (
                (root.exists(state) and _step(root.read_json(state)) >= 4)
                if ready == 2
                else (mlflow.get_experiment_by_name(name) and len(_member_runs(name)) == 4)
            ):
                break
            assert driver.poll() is None, driver.communicate()
            time.sleep(0.1)
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=60)
        assert driver.returncode == 143, stderr
        assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr
        assert "Token authentication is enabled" not in stderr, stderr  # Ray's notice
        members = _member_runs(name)
        assert len(members) == 4 and {r.info.status for r in members} == {"KILLED"}
        parent = members[0].data.tags["mlflow.parentRunId"]
        assert mlflow.get_run(parent).info.status == "KILLED"
        # toy-early is stopped before its one round ends, unless the signal's raise landed
        # where Python swallows it (a finaliser): then at the round's end, the state kept
        if ready == 2 or root.exists(state):
            assert "terminated: the search state is kept; continue with: physflow pbt" in stderr
            assert stderr.rstrip().endswith("--resume"), stderr
        else:
            assert "terminated: before the first ready point: nothing kept" in stderr, stderr


TERMINATING = '''
import os, signal, time
from actors.pbt.toy import ToyTrainer


class Terminating(ToyTrainer):
    """The first member at step 3 sends SIGTERM to the driver, waiting on its steps."""

    def __init__(self, seed, driver, marker):
        super().__init__(seed, lr=0.05)
        self.driver, self.marker = driver, marker

    def step(self, hparams):
        if self.steps_ == 3 and self.driver and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(self.driver, signal.SIGTERM)
        time.sleep(0.2)
        return super().step(hparams)


def build(seed, options):
    return Terminating(seed, options["driver"], options["marker"])
'''


def test_sigterm_while_ray_waits_is_still_a_sigterm(home, ray_local, tmp_path):
    """Ray turns an exception raised by a signal handler during its waits into a plain
    KeyboardInterrupt; the search still ends as terminated (exit 143), not interrupted."""
    from flows.runtime import Terminated

    (tmp_path / "terminating_trainable.py").write_text(TERMINATING)
    spec = toy("name=toy-wait", "trainable=terminating_trainable:build",
               f"options={{driver: {os.getpid()}, marker: {tmp_path / 'sent'}}}",
               "ready_interval_steps=40")  # fmt: skip
    with pytest.raises(Terminated):
        run_pbt(spec)
    assert (tmp_path / "sent").exists()


def _step(state: dict) -> int:
    return min(s["segments"][-1]["end"] if s["segments"] else 0
               for s in state["lineage"]["members"])  # fmt: skip


def test_cli_runs_and_reports_user_errors(home, ray_local):
    ok = runner.invoke(app, ["pbt", "run", str(TOY), "--set", "steps_per_member=8"])
    assert ok.exit_code == 0, ok.output
    assert "winner    member" in ok.output and "experiment pbt-toy" in ok.output
    cases = [
        (["pbt", str(TOY), "--set", "name=e1", "--set", "search_space.h0.low=3"],
         "search_space.h0: Value error, empty range"),
        (["pbt", str(TOY), "--set", "name=e2", "--set", "search_space.h0.prior=log_uniform"],
         "search_space.h0: Value error, a log scale needs bounds above 0"),
        (["pbt", str(TOY), "--set", "name=e3", "--set", "trainable=nowhere.mod:build"],
         "trainable 'nowhere.mod:build': cannot import module 'nowhere.mod'"),
        (["pbt", str(TOY), "--set", "name=e4", "--set", "trainable=actors.pbt.toy:absent"],
         "trainable 'actors.pbt.toy:absent': module 'actors.pbt.toy' has no attribute"),
        (["pbt", str(TOY), "--set", "name=e5", "--set", "metric=accuracy"],
         "metric: 'accuracy' is not in the trainable's report (it reports: loss, q)"),
        (["pbt", str(TOY), "--set", "name=e6", "--set", "options.nope=1"],
         "trainable 'toy': options: unknown key 'nope'"),
        (["pbt", str(TOY), "--set", "name=e8",
          "--set", "search_space.h2={prior: uniform, low: 0, high: 1}"],
         "search_space.h2: the toy trainable has no hyperparameter 'h2' (known: h0, h1, lr)"),
        (["pbt", str(TOY), "--set", "name=e9", "--set", "initial=[]",
          "--set", "search_space={h0: {prior: uniform, low: 0, high: 1}}"],
         "trainable 'toy': search_space: needs h1"),
        (["pbt", str(TOY), "--set", "name=e10", "--set", "initial=[{h0: 5.0, h1: 0.0}]"],
         "initial[0].h0: 5.0 outside search_space.h0's ["),
        (["pbt", str(TOY), "--set", "name=e7", "--set", "resources.member_gpus=1"],
         "resources: 4 members want 4 GPUs in all, and the Ray cluster has 0"),
        (["pbt", str(TOY), "--set", "name=never", "--resume"], "has no state"),
        # a search of that name exists (pbt-toy, above): the typo is what is reported
        (["pbt", str(TOY), "--set", "trainable=toyy"], "trainable 'toyy'"),
        (["pbt", "replay", "not-a-run"], "neither a lineage.json file nor the run id"),
    ]  # fmt: skip
    for args, message in cases:
        got = runner.invoke(app, args)
        assert got.exit_code == 2, (args, got.output)
        assert message in got.output, (args, got.output)
        assert "Traceback" not in got.output and len(got.output.strip().splitlines()) == 1
    # a replay that found nothing to replay leaves nothing behind in MLflow
    assert mlflow.MlflowClient().get_experiment_by_name("pbt-replay") is None


def test_a_starting_point_written_without_a_dot_is_still_a_number():
    """YAML reads 1e-1 as a string; it is in range all the same, and refused only if not."""
    assert toy("initial=[{h0: 1e-1, h1: 0.0}]").initial[0]["h0"] == "1e-1"
    with pytest.raises(UserError, match=r"initial\[0\].h0: '9e0' outside search_space.h0"):
        toy("initial=[{h0: 9e0, h1: 0.0}]")
    with pytest.raises(UserError, match=r"initial\[0\].h0: 'abc' is not a number"):
        toy("initial=[{h0: abc, h1: 0.0}]")
