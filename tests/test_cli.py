"""The `physflow` command through typer's runner: exit codes and what a person reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()

SPEC = """
name: tiny
samples: 6
samples_per_task: 2
test_fraction: 0.2
simulation: {pde: diffusion-sorption, nx: 32, nt: 6, t_end: 50.0}
"""


def physflow(*args, **env):
    return runner.invoke(app, list(args), env=env or None)


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(SPEC)
    return path


@pytest.mark.parametrize(
    "command", [[], ["preprocess"], ["datasets"], ["datasets", "show"], ["runs"]]
)
def test_every_command_has_help(command):
    result = physflow(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_end_to_end_on_embedded_defaults(home, spec, dask_address):
    result = physflow("preprocess", str(spec), "--set", "samples=8", "--dask-address", dask_address)
    assert result.exit_code == 0, result.output
    assert "published tiny v1: 8 samples (train 6, test 2)" in result.output
    assert (home / "datasets/tiny/v1/manifest.json").is_file()
    # The embedded MLflow keeps its database and artifacts under the same folder.
    assert (home / "mlflow.db").is_file()
    pngs = list((home / "mlartifacts/preprocess").rglob("trajectories.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG"
    assert not (home.parent / "mlruns").exists()

    listed = physflow("datasets")
    assert listed.exit_code == 0 and "tiny" in listed.output and "v1" in listed.output

    shown = physflow("datasets", "show", "tiny", "--verify")
    assert shown.exit_code == 0, shown.output
    assert "grid x    32 points" in shown.output
    assert "verified  4 shards: every checksum matches" in shown.output
    manifest = json.loads(physflow("datasets", "show", "tiny", "--json").output)
    assert manifest["splits"]["train"]["rows"] == 6

    runs = physflow("runs", "--experiment", "preprocess")
    assert runs.exit_code == 0, runs.output
    assert "tiny-v1" in runs.output and "FINISHED" in runs.output and "samples" in runs.output
    every = physflow("runs")  # every experiment's latest runs, each with its key metric
    assert every.exit_code == 0, every.output
    assert "preprocess" in every.output and "tiny-v1" in every.output
    assert "samples 8" in every.output

    again = physflow("preprocess", str(spec), "--set", "samples=8", "--dask-address", dask_address)
    assert again.exit_code == 0 and "already published" in again.output
    # publishing the same spec again is a no-op, in MLflow too
    assert len(mlflow.search_runs(experiment_names=["preprocess"], output_format="list")) == 1


def test_embedded_dask_cluster(home, spec):
    result = physflow("preprocess", str(spec), "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "published tiny v1: 6 samples" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "samples=0"], "samples: Input should be greater than or equal to 2"),
        (["--set", "simulation.dx=1"], "simulation.dx: unknown key"),
        (["--set", "samples"], "--set 'samples': expected key.path=value"),
        (["--storage", "ftp://host/x"], "unsupported scheme 'ftp'"),
        (["--storage", "s3://"], "no bucket name"),
        (["--dask-address", "tcp://127.0.0.1:9"], "Dask scheduler tcp://127.0.0.1:9: cannot"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(home, spec, args, message):
    result = physflow("preprocess", str(spec), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_refused_preprocess_opens_no_mlflow_run(home, spec, dask_address):
    args = ["preprocess", str(spec), "--dask-address", dask_address, "--set"]
    assert physflow(*args, "samples=8").exit_code == 0
    refused = physflow(*args, "samples=10")
    assert refused.exit_code == 2 and "already published from a different spec" in refused.output
    runs = mlflow.search_runs(experiment_names=["preprocess"], output_format="list")
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_missing_things_exit_2(home, tmp_path):
    cases = [
        (["preprocess", str(tmp_path / "nope.yaml")], "spec file not found"),
        (["preprocess", str(tmp_path)], "a folder, not a spec file"),
        (["datasets", "show", "absent"], "data set 'absent' not found"),
        (["datasets", "show", "BAD NAME"], "data set 'BAD NAME': use lower-case"),
        (["runs", "--experiment", "nothing"], "experiment 'nothing' not found"),
        (["preprocess"], "Missing argument"),
    ]
    for args, message in cases:
        result = physflow(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["trian"], "physflow: No such command 'trian'. Did you mean 'train'? (see physflow "),
        (["train"], "physflow train: Missing argument 'spec'. (see physflow train --help)"),
        (["runs", "--limit", "0"], "physflow runs: Invalid value for '--limit': Input should be "
                                   "greater than or equal to 1 (see physflow runs --help)"),
        (["submit", "x.yaml", "--gpu-workers", "-1"], "physflow submit: Invalid value for "
                                                      "'--gpu-workers'"),
        (["pbt", "replay"], "physflow pbt replay: Missing argument 'source'."),
        (["train", "x.yaml", "--bogus"], "physflow train: No such option: --bogus"),
    ],
)  # fmt: skip
def test_a_usage_mistake_is_one_line_naming_the_command(args, line):
    result = physflow(*args)
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(line), result.output


def test_corrupt_shard_exits_1(home, spec, dask_address):
    assert physflow("preprocess", str(spec), "--dask-address", dask_address).exit_code == 0
    shard = home / "datasets/tiny/v1/test/part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    result = physflow("datasets", "show", "tiny", "--verify")
    assert result.exit_code == 1
    assert "test/part-00000.parquet: checksum mismatch" in result.output


def test_the_browse_hint_names_the_ui_that_serves_the_store(tmp_path, monkeypatch):
    from flows.cli import browse_hint

    monkeypatch.chdir(tmp_path)
    assert browse_hint(f"sqlite:///{tmp_path}/.physflow/mlflow.db").startswith("make ui ")
    other = f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    assert browse_hint(other).startswith(f"mlflow ui --backend-store-uri {other} ")
    assert browse_hint("http://127.0.0.1:5001").startswith("http://127.0.0.1:5001 ")


def test_an_mlflow_server_that_is_not_up_is_one_line_at_once(home, monkeypatch):
    from infra.services import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    result = physflow("runs")  # MLflow's client alone retries for about four minutes
    assert result.exit_code == 2, result.output
    assert "cannot connect (Connection refused; is the server up?)" in result.output
    assert "Traceback" not in result.output and time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"MLFLOW_TRACKING_URI": "htp:/bad"}, ["runs"], "MLFLOW_TRACKING_URI=htp:/bad: not a"),
        ({"MLFLOW_TRACKING_URI": "/tmp/x"}, ["runs"], "MLFLOW_TRACKING_URI=/tmp/x: not a track"),
        ({"PHYSFLOW_HOME": "{file}"}, ["runs"], "PHYSFLOW_HOME={file}: cannot be a folder here"),
        ({}, ["datasets", "--storage", "{file}"], "storage {file}: cannot be a folder here"),
        (
            {"MLFLOW_TRACKING_URI": "sqlite:///{file}/m.db"},
            ["runs"],
            "MLflow store sqlite:///{file}/m.db: cannot be created",
        ),
    ],
)
def test_a_bad_store_setting_is_one_line(home, tmp_path, env, args, message):
    file = tmp_path / "notes.txt"
    file.write_text("a file")
    env = {k: v.format(file=file) for k, v in env.items()}
    result = physflow(*[a.format(file=file) for a in args], **env)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {message.format(file=file)}" or (
        message.format(file=file) in result.output and len(result.output.splitlines()) == 1
    ), result.output


def test_the_continue_hint_is_the_typed_command_or_in_a_job_its_submission(monkeypatch):
    from flows.cli_group import continue_with

    monkeypatch.delenv("PHYSFLOW_SUBMISSION_ID", raising=False)
    typed = ["physflow", "train", "my spec.yaml", "--set", "training.steps=9"]
    assert continue_with(typed, ["--resume"]) == (
        "physflow train 'my spec.yaml' --set training.steps=9 --resume"
    )
    monkeypatch.setenv("PHYSFLOW_SUBMISSION_ID", "physflow-train-x-0123")  # in a Ray job
    hint = continue_with(typed, ["--resume"])
    assert hint.startswith("physflow submit SPEC --submission-id NEW-ID -- --resume ")
    assert continue_with(["physflow", "run", "q.yaml"]).startswith(
        "physflow submit SPEC --submission-id NEW-ID ("
    )


def test_progress_off_a_terminal_is_a_line_now_and_then_and_at_the_end(capsys):
    from flows.cli_group import Progress

    with Progress("train demo", "steps", field="loss", every_s=3600) as update:
        for step in range(1, 301):
            update(step, 300, 1.0 / step)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2  # the first step, then nothing for an hour but the last
    assert lines[0].startswith("train demo: 1/300 steps, loss 1 (")
    assert lines[1].startswith("train demo: 300/300 steps, loss 0.003333 (")


def test_interrupts_wait_for_a_deferred_block_then_arrive(capsys):
    """An optimiser update and its step count happen whole: Ctrl-C and SIGTERM raised
    inside the block arrive as it ends, each once, with the handlers as they were."""
    import os
    import signal

    from flows.runtime import Terminated, interrupts_deferred, sigterm_requests_stop

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("update")
            done.append("count")
    assert done == ["update", "count"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with sigterm_requests_stop(interrupt=True) as came, pytest.raises(Terminated):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("both")
    assert done[-1] == "both" and not came()  # the next job starts afresh
    # both held: the SIGTERM is what arrives (143), not the Ctrl-C raised before it
    with sigterm_requests_stop(interrupt=True), pytest.raises(Terminated):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
    # a save that may hang: one more is held (and said), the next arrives at once
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred(held_at_most=1, notice="saving; Ctrl-C again abandons it"):
            os.kill(os.getpid(), signal.SIGINT)
            done.append("held")
            os.kill(os.getpid(), signal.SIGINT)
            done.append("not reached")
    assert done[-1] == "held"
    assert "saving; Ctrl-C again abandons it" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


LISTENERS = """
import psutil, ray
from flows.runtime import start_local_ray

start_local_ray(1)
ray.get(ray.remote(lambda: 1).remote())  # a worker too
me = psutil.Process()
for p in [me, *me.children(recursive=True)]:
    for c in p.net_connections(kind="tcp"):
        if c.status == "LISTEN":
            print(p.name(), c.laddr.ip)
ray.shutdown()
"""


def test_the_embedded_ray_listens_on_loopback_only():
    """GCS, raylet, agents, workers and the metrics exporters of the Ray a job starts on
    this machine: none reachable from another (Ray's default on Linux: every interface)."""
    out = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.returncode == 0, out.stderr
    listening = [line.split() for line in out.stdout.splitlines()]
    names = {name for name, _ in listening}
    assert {"gcs_server", "raylet"} <= names, out.stdout
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for _, ip in listening), out.stdout


def test_a_ctrl_c_while_dask_workers_start_is_kept_for_the_driver():
    """Workers are spawned with Ctrl-C ignored; one that reaches the driver's main thread
    meanwhile is kept for once they have started (it used to be dropped, and the job ran
    on to the end). Sent to that thread: the process has others here, from other tests."""
    import signal
    import threading

    from flows.runtime import _workers_ignore_ctrl_c

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with _workers_ignore_ctrl_c():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # what workers inherit
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            reached.append("the end of the start")
    assert reached and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_jobs_started_together_on_a_fresh_folder_share_its_new_store(tmp_path):
    """The first jobs on a new PHYSFLOW_HOME create its SQLite store at once: one does,
    the others wait for it (two used to create its tables, and all but one failed)."""
    env = {**os.environ, "PHYSFLOW_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    cli = Path(sys.executable).parent / "physflow"
    procs = [subprocess.Popen([str(cli), "runs"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(4)]  # fmt: skip
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs


def test_a_corrupt_manifest_is_named_and_hides_nothing_else(home):
    broken = home / "datasets" / "broken" / "v1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    listed = physflow("datasets")
    assert listed.exit_code == 0, listed.output
    assert "skipped: " in listed.output and "broken/v1/manifest.json: manifest is corrupt" in (
        listed.output.replace("\n", "")
    )
    missing = physflow("datasets", "show", "nosuch")
    assert missing.exit_code == 2 and "'nosuch' not found" in missing.output
    assert "(published: broken)" in missing.output  # the other data set, not its corruption
