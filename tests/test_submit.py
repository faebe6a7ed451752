"""`physflow submit` against a real Ray head with token authentication, a real MLflow server
and the S3 store: the job runs there, `--follow` returns its outcome, its run and artifacts
land in that MLflow and that store, and every mistake is one line."""

from __future__ import annotations

import time
import uuid

import mlflow
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.errors import UserError
from flows.submit import RayJobs
from infra.services import free_port, start_ray_head

runner = CliRunner()
TOKEN = uuid.uuid4().hex

SPEC = """
name: {name}
samples: 6
samples_per_task: 3
test_fraction: 0.2
simulation: {{pde: diffusion-sorption, nx: 32, nt: 6, t_end: 50.0}}
"""


@pytest.fixture(scope="module")
def ray_head(s3, tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with token auth; jobs see the S3 credentials."""
    service = start_ray_head(tmp_path_factory.mktemp("ray"), TOKEN, env=s3.env, num_cpus=2)
    yield service
    service.stop()


@pytest.fixture
def cluster(ray_head, s3_env, mlflow_server, monkeypatch):
    """This shell pointed at the head, the MLflow server and a fresh S3 prefix."""
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", ray_head.url)
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ray_head


def spec_file(tmp_path, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPEC.format(name=name))
    return path


def physflow(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_submit_follow_runs_the_job_into_mlflow_and_s3(cluster, tmp_path, s3_env, mlflow_server):
    name = f"sub-{uuid.uuid4().hex[:6]}"
    spec = spec_file(tmp_path, name)
    result = physflow("submit", spec, "--follow", "--", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "published " + name in result.output  # the job's own output, streamed
    sid = result.output.split("submitted ", 1)[1].split()[0]
    assert sid.startswith(f"physflow-preprocess-{name}-")
    assert f"{sid} succeeded" in result.output

    # The job's run is in that MLflow server, its artifacts in the S3 store.
    mlflow.set_tracking_uri(mlflow_server.url)
    runs = mlflow.search_runs(
        experiment_names=["preprocess"],
        filter_string=f"attributes.run_name = '{name}-v1'",
        output_format="list",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["physflow.submission_id"] == sid
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert {"manifest.json", "spec.yaml"} <= names
    assert runs[0].info.artifact_uri.startswith("mlflow-artifacts:")
    from flows.storage import Storage

    store = Storage.from_env()
    assert store.exists(f"{s3_env}/datasets/{name}/v1/manifest.json")
    assert store.fs.find("physflow-test/mlartifacts"), "artifacts were not proxied to S3"

    # status / jobs / logs read the same job back; its metadata says what ran.
    status = physflow("status", sid)
    assert status.exit_code == 0, status.output
    assert "SUCCEEDED" in status.output and "exit code 0" in status.output
    assert "physflow.spec_digest" in status.output and "physflow.git_commit" in status.output
    listed = physflow("jobs")
    assert listed.exit_code == 0 and sid in listed.output
    logs = physflow("logs", sid)
    assert logs.exit_code == 0 and "published " + name in logs.output

    # A submission id already used on the cluster is refused, not run twice.
    again = physflow("submit", spec, "--submission-id", sid)
    assert again.exit_code == 2, again.output
    assert f"submission id '{sid}' is taken" in again.output
    assert "Traceback" not in again.output


def test_a_failing_job_makes_follow_fail_with_its_exit_code(cluster, tmp_path):
    spec = spec_file(tmp_path, f"bad-{uuid.uuid4().hex[:6]}")
    # Valid here; on the cluster the storage bucket does not exist: the job exits 2.
    result = physflow("submit", spec, "--follow", "--env", "PHYSFLOW_STORAGE=s3://no-such-bucket/x")
    assert result.exit_code == 2, result.output
    assert "bucket 'no-such-bucket' does not exist" in result.output  # the job's log
    assert "failed with exit code 2" in result.output
    assert "last available logs" not in result.output  # Ray's header of the log it appends
    assert "Traceback" not in result.output


def test_stop_a_running_job(cluster, tmp_path):
    spec = spec_file(tmp_path, f"stop-{uuid.uuid4().hex[:6]}")
    result = physflow("submit", spec, "--set", "samples=4000", "--", "--workers", "1")
    assert result.exit_code == 0, result.output
    sid = result.output.split("submitted ", 1)[1].split()[0]
    jobs = RayJobs()
    deadline = time.monotonic() + 120
    while "shards" not in jobs.logs(sid):  # the driver is at work
        assert time.monotonic() < deadline, jobs.logs(sid)
        time.sleep(0.2)
    stopped = physflow("stop", sid)
    assert stopped.exit_code == 0 and f"stopping {sid}" in stopped.output
    followed = physflow("logs", sid, "--follow")
    assert followed.exit_code == 143, followed.output  # as the job's own exit on SIGTERM
    assert f"job {sid} stopped" in followed.output
    # SIGTERM: the driver stops as on Ctrl-C, with time for it before Ray kills it
    assert "terminated: " in followed.output and "was not published" in followed.output
    env = jobs.client.get_job_info(sid).runtime_env["env_vars"]
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == "60"


def test_ctrl_c_while_following_leaves_the_job_running_and_says_so(cluster, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    from flows import submit

    spec = spec_file(tmp_path, f"follow-{uuid.uuid4().hex[:6]}")
    result = physflow("submit", spec, "--set", "samples=4000", "--", "--workers", "1")
    sid = result.output.split("submitted ", 1)[1].split()[0]
    follow = submit.RayJobs.follow

    def interrupted(self, submission_id, write):  # Ctrl-C as the first lines arrive
        def write_then_stop(chunk):
            raise KeyboardInterrupt

        return follow(self, submission_id, write_then_stop)

    monkeypatch.setattr(submit.RayJobs, "follow", interrupted)
    followed = physflow("logs", sid, "--follow")
    assert followed.exit_code == 130, followed.output
    assert f"interrupted: stopped following; {sid} runs on (physflow logs {sid} --follow" in (
        followed.output
    )
    status = physflow("status", sid)
    assert "RUNNING" in status.output or "PENDING" in status.output, status.output
    assert physflow("stop", sid).exit_code == 0


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("wrong-token", "refused the token from RAY_AUTH_TOKEN (403)"),
        (None, "requires a token (401): set RAY_AUTH_TOKEN"),
    ],
)
def test_token_missing_or_wrong(cluster, tmp_path, monkeypatch, token, message):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on
    if token is None:
        monkeypatch.delenv("RAY_AUTH_TOKEN")
    else:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    result = physflow("submit", spec_file(tmp_path, "tok"))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2


def test_token_from_a_file(cluster, tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    result = physflow("jobs")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["jobs", "--address", "http://127.0.0.1:{port}"], 2, "cannot connect"),
        (["status", "no-such-job"], 2, "no job 'no-such-job'"),
        (["submit", "{spec}", "--set", "samples=-1"], 2, "samples: Input should be"),
        (["submit", "{spec}", "--env", "AWS_SECRET_ACCESS_KEY=x"], 2, "credentials are not"),
        (["submit", "{spec}", "--env", "RAY_AUTH_TOKEN=x"], 2, "credentials are not"),
        (["submit", "{spec}", "--env", "POSTGRES_PASSWORD=x"], 2, "credentials are not"),
        (
            ["submit", "{spec}", "--env", "MLFLOW_TRACKING_URI=http://admin:pw@127.0.0.1:5000"],
            2,
            "credentials are not",
        ),
        (["submit", "{spec}", "--job", "nope"], 2, "--job 'nope': expected one of"),
        (
            ["submit", "{spec}", "--image", "r/physflow:0.1.0-ray2.60.0", "--gpu-workers", "2"],
            2,
            "--image, --gpu-workers: for a RayJob on Kubernetes only; add --kubernetes",
        ),
    ],
)
def test_mistakes_are_one_line(cluster, tmp_path, args, code, message):
    spec = spec_file(tmp_path, "m")
    port = free_port()
    result = physflow(*(a.format(port=port, spec=spec) for a in args))
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_password_in_the_shells_tracking_uri_is_not_sent(tmp_path, monkeypatch):
    from flows.submit import prepare

    spec = spec_file(tmp_path, "pw")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://admin:pw@127.0.0.1:5000")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI holds a password"):
        prepare(spec)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    sent = prepare(spec, env=["TOKENIZERS_PARALLELISM=false"])  # a name, not a credential
    assert sent.env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert sent.explicit_env["TOKENIZERS_PARALLELISM"] == "false"


def test_the_default_id_is_the_same_for_the_same_spec_and_code(tmp_path):
    from flows.submit import prepare

    spec = spec_file(tmp_path, "same")
    first, second = prepare(spec), prepare(spec, ["samples=6"])
    assert first.submission_id == second.submission_id
    assert prepare(spec, ["samples=7"]).submission_id != first.submission_id
    assert first.metadata["physflow.spec_digest"] == first.spec_digest
    assert first.env["PHYSFLOW_SUBMISSION_ID"] == first.submission_id


def test_no_address_at_all(tmp_path, monkeypatch):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    result = physflow("jobs")
    assert result.exit_code == 2 and "no Ray cluster given" in result.output


@pytest.mark.parametrize("bad", ["bad id/x", "bad id", "-x", "", "a" * 129])
def test_a_submission_id_ray_cannot_name_a_log_after_is_refused(tmp_path, bad):
    from flows.submit import prepare

    with pytest.raises(UserError, match=r"--submission-id .*letters, digits"):
        prepare(spec_file(tmp_path, "ids"), submission_id=bad)
    assert prepare(spec_file(tmp_path, "ids"), submission_id="my-run_2.b").submission_id == (
        "my-run_2.b"
    )


def test_a_failed_jobs_message_gives_its_last_log_line_not_rays_log_header():
    from flows.submit import _job_message

    failed = "Job entrypoint command failed with exit code 2"
    ray = failed + ", last available logs (truncated to 20,000 chars):"
    assert _job_message(ray + "\nstep 1\nerror: data set 'x' not found\n\n") == (
        failed + "; its last line: error: data set 'x' not found"
    )
    assert _job_message(ray) == failed
    assert _job_message(" Job was intentionally stopped. ") == "Job was intentionally stopped."


@pytest.mark.parametrize(
    "pair",
    ["PGPASSWORD=x", "DB_PASS=x", "GITHUB_PAT=x", "OPENAI_APIKEY=x", "AWS_SECRETACCESSKEY=x",
     "AZURE_STORAGE_CONNECTION_STRING=x", "CONN=DefaultEndpointsProtocol=https;AccountKey=k",
     "HF_TOKEN=x", "MY_AUTH=x"],
)  # fmt: skip
def test_credentials_under_any_common_name_are_not_sent(pair):
    from flows.submit import _parse_env

    with pytest.raises(UserError, match="credentials are not sent with a job"):
        _parse_env([pair])


def test_ordinary_variables_are_sent():
    from flows.submit import _parse_env

    pairs = ["TOKENIZERS_PARALLELISM=false", "OMP_NUM_THREADS=2", "PATHS=a", "PASSES=3"]
    assert _parse_env(pairs) == dict(p.split("=", 1) for p in pairs)


@pytest.mark.parametrize("command", ["status", "logs", "stop"])
@pytest.mark.parametrize("bad", ["", "?", "#", "?x=1", "a/b"])
def test_an_id_no_job_can_have_is_one_line(command, bad):
    result = physflow(command, bad, "--address", "http://127.0.0.1:9")
    assert result.exit_code == 2, result.output
    assert "is no job's id" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_relative_storage_folder_is_refused(tmp_path, monkeypatch):
    spec = spec_file(tmp_path, "rel")
    monkeypatch.setenv("PHYSFLOW_STORAGE", "reldir")
    result = physflow("submit", spec, "--address", "http://127.0.0.1:9")
    assert result.exit_code == 2 and "PHYSFLOW_STORAGE=reldir: a relative folder" in result.output
    monkeypatch.delenv("PHYSFLOW_STORAGE")
    result = physflow("submit", spec, "--address", "http://127.0.0.1:9", "--env",
                      "PHYSFLOW_STORAGE=data")  # fmt: skip
    assert result.exit_code == 2 and "PHYSFLOW_STORAGE=data: a relative folder" in result.output


def test_an_address_where_another_server_answers_is_one_line(monkeypatch):
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the server's log is not physflow's output
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    try:
        result = physflow("jobs", "--address", f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert result.exit_code == 2, result.output
    assert "is not a Ray cluster's job API" in result.output
    assert len(result.output.strip().splitlines()) == 1
