"""Submitting a job to a Ray cluster over the Ray Jobs API, and following it there.

`physflow submit <spec>` runs `physflow <job> <spec>` as a Ray job (the Ray Jobs API on the
head's dashboard port, `JobSubmissionClient`) instead of on this machine:

- The resolved spec (overrides applied, validated here first so a typo fails before it
  travels) is the job's `working_dir`; this checkout's `flows` and `actors` go as
  `py_modules`, so the cluster runs the code that was validated here.
- MLflow and storage settings (`MLFLOW_TRACKING_URI`, `PHYSFLOW_STORAGE`, the S3 endpoint)
  go in the job's environment. Credentials do not: they are the cluster's own (Secrets on
  Kubernetes, the environment of a local head), never copied into a job's record.
- The submission id is derived from the job, the spec's digest and the code's digest, so
  submitting the same thing twice is refused instead of running twice.
- Ray's token authentication is handled like Ray's own client: the token comes from
  `RAY_AUTH_TOKEN`, else the file named by `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`,
  and goes in an `Authorization: Bearer` header.

Every failure a person can meet (no cluster at the address, token missing or refused, an
id already taken, an unknown job) becomes one `UserError` line; a job that fails makes
`--follow` exit with the job's own exit code.

What is submitted (`Submission`, `prepare`), a job's state (`JobState`) and its outcome
(`outcome`) are shared with `flows.submit_kubernetes` (`physflow submit --kubernetes`),
which runs the job as a RayJob instead.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import importlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from flows.errors import JobFailure, PhysflowError, UserError
from flows.spec import Spec, apply_overrides, read_yaml, validate

log = logging.getLogger(__name__)

# The jobs a spec can be submitted as, and where each one's spec model lives.
JOB_SPECS = {
    "preprocess": "flows.preprocess:PreprocessSpec",
    "train": "flows.train:TrainSpec",
    "run": "flows.quickstart:RunSpec",
    "pbt": "flows.pbt:PbtSpec",
    "nas": "flows.nas:NASSpec",
}
# What a head answers while its job agent is still starting, and how long to keep asking.
NO_AGENT = "No available agent"
AGENT_WAIT_S = 60.0
# Settings a job needs to find the same MLflow and storage as this shell. Not secrets.
PASSED_ENV = (
    "MLFLOW_TRACKING_URI",
    "PHYSFLOW_STORAGE",
    "PHYSFLOW_S3_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "PHYSFLOW_DASK_ADDRESS",
)
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD")
# Any other name that says it holds a credential (RAY_AUTH_TOKEN, PGPASSWORD, DB_PASS,
# GITHUB_PAT, OPENAI_APIKEY, AZURE_STORAGE_CONNECTION_STRING, ...); TOKENIZERS_* is not one
SECRET_NAME = re.compile(
    r"SECRET|PASSW|CREDENTIAL|PRIVATE_?KEY|API_?KEY|ACCESS_?KEY|CONNECTION_?STRING"
    r"|TOKENS?(?:_|$)|(?:^|_)(?:PASS|PWD|PAT|AUTH)(?:_|$)",
    re.I,
)
# A value that carries one: a connection string's key or password
SECRET_VALUE = re.compile(r"(?:AccountKey|SharedAccessSignature|SharedAccessKey|Password|Pwd)=",
                          re.I)  # fmt: skip
ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
SPEC_FILE = "spec.yaml"
CODE_PACKAGES = ("flows", "actors")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# What is submitted ------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """A job ready to go: what runs, in which environment, under which id."""

    job: str
    name: str
    spec: dict[str, Any]
    spec_digest: str
    code_digest: str
    submission_id: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    explicit_env: dict[str, str] = field(default_factory=dict)  # from --env only

    def entrypoint(self, spec_path: str = SPEC_FILE) -> str:
        import shlex

        return shlex.join(["physflow", self.job, spec_path, *self.args])

    def on_image(self, image: str) -> Submission:
        """This job as run by `image`'s code (a RayJob), not by this checkout's: the
        image named where the checkout's digest and commit were, and a default id made
        from the image instead of the checkout."""
        code = _digest(image)
        default = _default_id(self.job, self.name, self.spec_digest, self.code_digest)
        sid = self.submission_id
        if sid == default:
            sid = _default_id(self.job, self.name, self.spec_digest, code)
        metadata = {k: v for k, v in self.metadata.items()
                    if k not in ("physflow.code_digest", "physflow.git_commit")}  # fmt: skip
        metadata["physflow.image"] = image
        return replace(
            self,
            code_digest=code,
            submission_id=sid,
            metadata=metadata,
            env={**self.env, "PHYSFLOW_SUBMISSION_ID": sid},
            explicit_env={**self.explicit_env, "PHYSFLOW_SUBMISSION_ID": sid},
        )


def _default_id(job: str, name: str, spec_digest: str, code_digest: str) -> str:
    return f"physflow-{job}-{_slug(name)}-{_digest(spec_digest + code_digest)[:10]}"


STOP_WAIT_VAR, STOP_WAIT_S = "RAY_JOB_STOP_WAIT_TIME_S", 60

# Ray keeps a job's log in a file named after its id: a '/' or a space there leaves the
# job pending for good, and no command could name it.
SUBMISSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def prepare(
    spec_path: str | Path,
    overrides: list[str] = (),
    job: str | None = None,
    submission_id: str | None = None,
    env: list[str] = (),
    args: list[str] = (),
) -> Submission:
    """Read, override and validate a spec, and describe the job that runs it."""
    data = apply_overrides(read_yaml(spec_path), list(overrides))
    job, spec = _resolve_job(job, data, str(spec_path))
    resolved = spec.resolved() if spec is not None else data
    spec_digest = spec.digest() if spec is not None else _digest(yaml.safe_dump(data))
    code_digest = code_fingerprint()
    name = str(resolved.get("name") or Path(spec_path).stem)
    explicit = _parse_env(env)
    job_env = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
    for key, value in job_env.items():
        if _has_password(value):
            raise UserError(
                f"{key} holds a password (user:password@ in the URL): it would be stored in "
                f"the job's record; set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                f"on the cluster instead and give the URL without it"
            )
    # Ray sends a stopped job SIGTERM and kills it 3 s later by default: time for a paper-size
    # checkpoint and the MLflow run's end (an --env of the same name decides otherwise)
    explicit.setdefault(STOP_WAIT_VAR, str(STOP_WAIT_S))
    job_env.update(explicit)
    storage = job_env.get("PHYSFLOW_STORAGE", "")
    if storage and "://" not in storage and not Path(storage).expanduser().is_absolute():
        raise UserError(
            f"PHYSFLOW_STORAGE={storage}: a relative folder would be taken inside the job's "
            f"working folder on the cluster, which Ray deletes; give an absolute path or "
            f"an s3:// URL"
        )
    default_id = _default_id(job, name, spec_digest, code_digest)
    if submission_id is not None and not SUBMISSION_ID.fullmatch(submission_id):
        raise UserError(
            f"--submission-id {submission_id!r}: use letters, digits, '.', '_' and '-' "
            f"(starting with a letter or digit, at most 128)"
        )
    submission_id = submission_id or default_id
    job_env["PHYSFLOW_SUBMISSION_ID"] = submission_id
    metadata = {
        "physflow.job": job,
        "physflow.spec_name": name,
        "physflow.spec_digest": spec_digest,
        "physflow.code_digest": code_digest,
        "physflow.user": _user(),
        "physflow.git_commit": git_commit() or "unknown",
    }
    return Submission(
        job=job,
        name=name,
        spec=resolved,
        spec_digest=spec_digest,
        code_digest=code_digest,
        submission_id=submission_id,
        args=tuple(args),
        env=job_env,
        metadata=metadata,
        explicit_env={**explicit, "PHYSFLOW_SUBMISSION_ID": submission_id},
    )


def _resolve_job(job: str | None, data: dict, source: str) -> tuple[str, Spec | None]:
    """The job named, or the one job whose spec model accepts `data`."""
    if job is not None:
        if job not in JOB_SPECS:
            raise UserError(f"--job {job!r}: expected one of {', '.join(JOB_SPECS)}")
        model = _spec_model(job)
        return job, (validate(model, data, source) if model is not None else None)
    accepted, errors = [], {}
    for candidate in JOB_SPECS:
        model = _spec_model(candidate)
        if model is None:
            continue
        try:
            accepted.append((candidate, validate(model, data, source)))
        except UserError as exc:
            errors[candidate] = str(exc)
    if len(accepted) == 1:
        return accepted[0]
    if accepted:
        names = " or ".join(j for j, _ in accepted)
        raise UserError(f"{source}: valid as {names}; say which with --job")
    # The job whose model objects least is most likely the one meant.
    closest = min(errors, key=lambda j: errors[j].count(";"))
    raise UserError(f"{errors[closest]} (read as a {closest} spec; --job names another)")


def _spec_model(job: str) -> type[Spec] | None:
    """The job's spec model, or None when that job is not installed here."""
    module_name, _, class_name = JOB_SPECS[job].partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - a job that does not import here cannot be checked here
        return None
    model = getattr(module, class_name, None)
    if isinstance(model, type) and issubclass(model, Spec):
        return model
    # A job module names its spec model after itself; take the one top-level model whose
    # fields include `name`, defined in that module.
    models = [
        v
        for v in vars(module).values()
        if isinstance(v, type)
        and issubclass(v, Spec)
        and v.__module__ == module_name
        and "name" in v.model_fields
    ]
    return models[0] if len(models) == 1 else None


def _parse_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for text in pairs:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise UserError(f"--env {text!r}: expected NAME=value")
        if (key in SECRET_ENV or SECRET_NAME.search(key) or SECRET_VALUE.search(value)
                or _has_password(value)):  # fmt: skip
            raise UserError(
                f"--env {key}: credentials are not sent with a job (they would be stored "
                f"in its record); give them to the cluster instead (a Secret, or the "
                f"environment its head was started in)"
            )
        out[key] = value
    return out


def _has_password(value: str) -> bool:
    """A URL with a password in it (scheme://user:password@host...)."""
    from urllib.parse import urlsplit

    try:
        return "://" in value and urlsplit(value).password is not None
    except ValueError:
        return False


def code_fingerprint() -> str:
    """A digest of the Python sources that travel with a job."""
    h = hashlib.sha256()
    for folder in _code_folders():
        for path in sorted(folder.rglob("*.py")):
            h.update(str(path.relative_to(folder.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _code_folders() -> list[Path]:
    return [Path(importlib.import_module(p).__file__).parent for p in CODE_PACKAGES]


def git_commit() -> str | None:
    """The commit of the checkout the code comes from, `+dirty` if it has changes."""
    root = _code_folders()[0].parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", *CODE_PACKAGES],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _slug(name: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return out[:30] or "job"


# The cluster ------------------------------------------------------------------------------


def cluster_address(address: str | None = None) -> str:
    """The Jobs API URL: `--address`, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS."""
    for candidate in (address, *(os.environ.get(v) for v in ADDRESS_VARS)):
        if candidate:
            break
    else:
        raise UserError(
            "no Ray cluster given: pass --address http://<head>:8265 or set RAY_ADDRESS "
            "(make stack-up starts one on this machine)"
        )
    if "://" not in candidate:
        candidate = f"http://{candidate}"
    if not candidate.startswith(("http://", "https://")):
        raise UserError(
            f"Ray cluster {candidate!r}: the Jobs API is an http(s):// address, "
            f"e.g. http://127.0.0.1:8265"
        )
    return candidate.rstrip("/")


def auth_token() -> tuple[str | None, str]:
    """Ray's token and where it came from, looked up in Ray's own order."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path_var = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_var).expanduser() if path_var else Path.home() / ".ray" / "auth_token"
    source = "RAY_AUTH_TOKEN_PATH" if path_var else str(path)
    try:
        token = path.read_text().strip()
    except OSError:
        if path_var:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path_var}: cannot read the token") from None
        return None, "none"
    return (token or None), source


@dataclass(frozen=True)
class JobState:
    """One job as the cluster reports it."""

    submission_id: str
    status: str
    message: str
    entrypoint: str
    start_s: float | None
    end_s: float | None
    exit_code: int | None
    metadata: dict[str, str]

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def duration_s(self) -> float | None:
        if self.start_s is None:
            return None
        return (self.end_s or time.time()) - self.start_s


class RayJobs:
    """The Ray Jobs API of one cluster, with its failures as one-line errors."""

    def __init__(self, address: str | None = None):
        self.address = cluster_address(address)
        self.token, self.token_source = auth_token()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        from ray.job_submission import JobSubmissionClient

        # Ray's client reports each package upload at INFO, through handlers bound to the
        # stderr of the moment; a person reads our lines instead.
        for name in list(logging.root.manager.loggerDict):
            if name == "ray" or name.startswith("ray."):
                logging.getLogger(name).setLevel(logging.WARNING)
        # Ray's client prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS to the address it is
        # given; the one chosen here (`--address` first) is the one it must use.
        saved = os.environ.get("RAY_API_SERVER_ADDRESS")
        os.environ["RAY_API_SERVER_ADDRESS"] = self.address
        try:
            with self._errors():
                self.client = JobSubmissionClient(self.address, headers=headers)
        finally:
            if saved is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = saved

    def submit(self, sub: Submission) -> str:
        """Submit `sub`; its spec goes in a fresh working_dir, the code as py_modules."""
        folder = Path(tempfile.mkdtemp(prefix="physflow-submit-"))
        try:
            (folder / SPEC_FILE).write_text(yaml.safe_dump(sub.spec, sort_keys=False))
            runtime_env = {
                "working_dir": str(folder),
                "py_modules": [str(p) for p in _code_folders()],
                "excludes": ["__pycache__", "*.pyc"],
                "env_vars": dict(sub.env),
            }
            deadline = time.monotonic() + AGENT_WAIT_S
            while True:
                try:
                    with self._errors(sub.submission_id):
                        return self.client.submit_job(
                            entrypoint=sub.entrypoint(),
                            submission_id=sub.submission_id,
                            runtime_env=runtime_env,
                            metadata=dict(sub.metadata),
                        )
                except JobFailure as exc:
                    # A head that has just started answers before its job agent has
                    # registered; Ray asks to try again later. Nothing was submitted.
                    if NO_AGENT not in str(exc) or time.monotonic() > deadline:
                        raise
                    log.info("%s: the job agent is not up yet; retrying", self.address)
                    time.sleep(1.0)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def state(self, submission_id: str) -> JobState:
        with self._errors(submission_id):
            info = self.client.get_job_info(submission_id)
        return _state(submission_id, info)

    def list(self) -> list[JobState]:
        with self._errors():
            jobs = self.client.list_jobs()
        rows = [_state(j.submission_id, j) for j in jobs if j.submission_id]
        return sorted(rows, key=lambda r: r.start_s or 0, reverse=True)

    def logs(self, submission_id: str) -> str:
        with self._errors(submission_id):
            return self.client.get_job_logs(submission_id)

    def follow(self, submission_id: str, write: Callable[[str], None]) -> JobState:
        """Stream the job's logs to `write` until it ends; its final state."""

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(submission_id):
                write(chunk)

        self.state(submission_id)  # an unknown id fails here, with its own message
        try:
            with self._errors(submission_id):
                asyncio.run(tail())
        except JobFailure:
            pass  # the stream broke off; the job's state below says how it ended
        state = self.state(submission_id)
        while not state.terminal:  # the stream can close a moment before the status turns
            time.sleep(0.2)
            state = self.state(submission_id)
        return state

    def stop(self, submission_id: str) -> bool:
        with self._errors(submission_id):
            return bool(self.client.stop_job(submission_id))

    def wait_running(self, submission_id: str, timeout_s: float = 600) -> JobState:
        """Poll until the job leaves PENDING (for measuring, and for `submit --wait`)."""
        deadline = time.monotonic() + timeout_s
        state = self.state(submission_id)
        while state.status == "PENDING" and time.monotonic() < deadline:
            time.sleep(0.05)
            state = self.state(submission_id)
        return state

    @contextmanager
    def _errors(self, submission_id: str | None = None) -> Iterator[None]:
        """Ray's client errors, as the one line a person needs."""
        import requests
        from ray.exceptions import AuthenticationError

        where = f"Ray cluster at {self.address}"
        try:
            yield
        except PhysflowError:
            raise
        except AuthenticationError as exc:
            # Without a token of ours, a refusal means one is needed (Ray's client may still
            # have sent one it cached earlier in this process).
            if self.token is None or "required" in str(exc).lower():
                raise UserError(
                    f"{where} requires a token (401): set RAY_AUTH_TOKEN or "
                    f"RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token"
                ) from None
            raise UserError(
                f"{where} refused the token from {self.token_source} (403): "
                f"it is not this cluster's token"
            ) from None
        except (ConnectionError, requests.exceptions.ConnectionError):
            raise UserError(
                f"{where}: cannot connect (is the cluster up, and is this its dashboard "
                f"address, e.g. http://127.0.0.1:8265?)"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise UserError(f"{where}: {_first_line(exc)}") from None
        except RuntimeError as exc:
            text = str(exc)
            if "already exists" in text:
                raise UserError(
                    f"submission id {submission_id!r} is taken on {self.address}: it was "
                    f"submitted before (see physflow status {submission_id}); pass "
                    f"--submission-id to run it again"
                ) from None
            if "does not exist" in text or "status code 404" in text:
                raise UserError(f"no job {submission_id!r} on {self.address}") from None
            if "Jobs API is not supported" in text:  # another server answers there
                raise UserError(
                    f"{self.address} is not a Ray cluster's job API (it answers, but not as "
                    f"Ray's dashboard does; that is on port 8265 by default)"
                ) from None
            raise JobFailure(f"{where}: {_ray_reason(text)}") from None


def _state(submission_id: str, info: Any) -> JobState:
    status = getattr(info.status, "value", str(info.status))
    return JobState(
        submission_id=submission_id,
        status=status,
        message=_job_message(info.message or ""),
        entrypoint=info.entrypoint or "",
        start_s=info.start_time / 1000 if info.start_time else None,
        end_s=info.end_time / 1000 if info.end_time else None,
        exit_code=getattr(info, "driver_exit_code", None),
        metadata=dict(info.metadata or {}),
    )


# Ray appends the job's log to a failed job's message after this (its first line ends there).
_RAY_LOG_TAIL = re.compile(r",? *last available logs \(truncated to [\d,]+ chars\):(.*)", re.S)


def _job_message(message: str) -> str:
    """Ray's message without the log it appends, but with that log's last line."""
    found = _RAY_LOG_TAIL.search(message)
    if found is None:
        return message.strip()
    lines = [ln.strip() for ln in found.group(1).splitlines() if ln.strip()]
    reason = message[: found.start()].strip()
    return reason + (f"; its last line: {lines[-1][:300]}" if lines else "")


def outcome(state: JobState) -> None:
    """Raise the job's failure with its exit code; return if it succeeded."""
    if state.status == "SUCCEEDED":
        return
    failure = JobFailure(
        f"job {state.submission_id} {state.status.lower()}"
        + (f" with exit code {state.exit_code}" if state.exit_code else "")
        + (f": {_first_line(state.message)}" if state.message else "")
    )
    if state.exit_code and state.exit_code > 0:
        failure.exit_code = state.exit_code
    else:  # Ray records no driver exit code for a job it stopped: SIGTERM's, as a shell's
        failure.exit_code = 143 if state.status == "STOPPED" else 1
    raise failure


def _ray_reason(text: str) -> str:
    """The last meaningful line of a server-side traceback that Ray passes on."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip(" .")]
    return lines[-1][:300] if lines else "request failed"


def _first_line(value: Any) -> str:
    lines = str(value).strip().splitlines()
    return lines[0][:300] if lines else type(value).__name__
