"""`physflow submit | jobs | status | logs | stop` (registered on the main app by flows.cli).

Thin commands over `flows.submit`: parse, call, print. A Ray cluster is reached at
`--address` (default RAY_API_SERVER_ADDRESS / RAY_ADDRESS); `--kubernetes` goes through the
Kubernetes API instead (`flows.submit_kubernetes`), with a RayJob that brings its own cluster.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from flows.errors import UserError

AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray Jobs API, e.g. http://127.0.0.1:8265 [env: RAY_API_SERVER_ADDRESS, RAY_ADDRESS]",
    ),
]
KubernetesOption = Annotated[
    bool, typer.Option("--kubernetes", help="a RayJob on Kubernetes (kubeconfig or in-cluster)")
]
NamespaceOption = Annotated[
    str | None,
    typer.Option(help="Kubernetes namespace [default: the kubeconfig context's, else physflow]"),
]


def _submission_id(value: str) -> str:
    from flows.submit import SUBMISSION_ID

    if not SUBMISSION_ID.fullmatch(value):
        raise typer.BadParameter(
            f"{value!r} is no job's id (letters, digits, '.', '_' and '-'; see physflow jobs)"
        )
    return value


IdArgument = Annotated[
    str, typer.Argument(help="submission id (or RayJob name)", callback=_submission_id)
]


def register(app, reports_errors, out, err) -> None:
    """Add this module's commands to `app`."""

    @app.command()
    @reports_errors
    def submit(
        spec: Annotated[Path, typer.Argument(help="job spec (YAML)", show_default=False)],
        job_args: Annotated[
            list[str] | None,
            typer.Argument(help="after --: options for the job command, e.g. -- --workers 2"),
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", "-s", help="override a spec key: key.path=value (repeatable)"),
        ] = None,
        job: Annotated[
            str | None,
            typer.Option(help="preprocess, train, run, pbt or nas [default: from the spec]"),
        ] = None,
        address: AddressOption = None,
        submission_id: Annotated[
            str | None,
            typer.Option(help="[default: from the job, the spec's and the code's digests]"),
        ] = None,
        env: Annotated[
            list[str] | None,
            typer.Option("--env", "-e", help="NAME=value for the job's environment (repeatable)"),
        ] = None,
        follow: Annotated[
            bool, typer.Option("--follow", "-f", help="stream logs; exit with the job's outcome")
        ] = False,
        kubernetes: KubernetesOption = False,
        namespace: NamespaceOption = None,
        image: Annotated[
            str | None,
            typer.Option(help="--kubernetes: the physflow image [env: PHYSFLOW_IMAGE]"),
        ] = None,
        gpu_workers: Annotated[
            int,
            typer.Option(
                min=0,
                max=64,
                help="--kubernetes: GPU workers (1 GPU each); train, run and nas get one "
                "more, for the driver that trains their network",
            ),
        ] = 0,
        cpu_workers: Annotated[
            int, typer.Option(min=0, max=64, help="--kubernetes: CPU workers")
        ] = 1,
    ) -> None:
        """Run a job on a Ray cluster: spec and code travel with it, runs go to its MLflow."""
        from flows import submit as sub_mod

        only_kubernetes = {
            "--image": image is not None,
            "--gpu-workers": gpu_workers != 0,
            "--cpu-workers": cpu_workers != 1,
            "--namespace": namespace is not None,
        }
        if not kubernetes and any(only_kubernetes.values()):
            given = ", ".join(k for k, v in only_kubernetes.items() if v)
            raise UserError(
                f"{given}: for a RayJob on Kubernetes only; add --kubernetes (without it the "
                "job goes to the Ray cluster at --address / RAY_ADDRESS)"
            )
        prepared = sub_mod.prepare(spec, set_ or [], job, submission_id, env or [], job_args or [])
        if not kubernetes and "PHYSFLOW_STORAGE" not in prepared.env:
            err.print(
                "note: PHYSFLOW_STORAGE is not set here: the job writes where the cluster's "
                "own PHYSFLOW_STORAGE says, or, on a cluster without one, under its working "
                "directory, which goes when the job ends"
            )
        if kubernetes:
            from flows.submit_kubernetes import KubeRayJobs

            jobs = KubeRayJobs(namespace)
            name = jobs.submit(prepared, image, gpu_workers=gpu_workers, cpu_workers=cpu_workers)
            out.print(f"submitted {name} (RayJob in namespace {jobs.namespace})")
            if follow:
                with _still_running(name, ["--kubernetes"]):
                    state = jobs.follow(name, _write)
                jobs.delete(name)
                sub_mod.outcome(state)
                out.print(f"{name} succeeded; RayJob and its cluster removed")
            return
        jobs = sub_mod.RayJobs(address)
        sid = jobs.submit(prepared)
        out.print(f"submitted {sid} ({prepared.job} {prepared.name}) to {jobs.address}")
        if not follow:
            out.print(f"  follow  physflow logs {sid} --follow")
            return
        with _still_running(sid):
            state = jobs.follow(sid, _write)
        sub_mod.outcome(state)
        out.print(f"{sid} succeeded in {state.duration_s or 0:.1f} s")

    @app.command()
    @reports_errors
    def jobs(
        address: AddressOption = None,
        kubernetes: KubernetesOption = False,
        namespace: NamespaceOption = None,
    ) -> None:
        """List the cluster's jobs, newest first."""
        from rich.table import Table

        client = _client(address, kubernetes, namespace)
        rows = client.list()
        if not rows:
            out.print(f"no jobs on {_where(client)}")
            return
        table = Table(
            "id", "job", "status", "start", "duration", "message",
            title=f"jobs on {_where(client)}", title_justify="left",
        )  # fmt: skip
        for r in rows:
            table.add_row(
                r.submission_id,
                r.metadata.get("physflow.job", "-"),
                r.status,
                _time(r.start_s),
                f"{r.duration_s:.1f} s" if r.duration_s is not None else "-",
                r.message.splitlines()[0][:60] if r.message else "",
            )
        out.print(table)

    @app.command()
    @reports_errors
    def status(
        submission_id: IdArgument,
        address: AddressOption = None,
        kubernetes: KubernetesOption = False,
        namespace: NamespaceOption = None,
    ) -> None:
        """One job's status, exit code and metadata."""
        state = _client(address, kubernetes, namespace).state(submission_id)
        out.print(f"{state.submission_id}  {state.status}")
        if state.message:
            out.print(f"  message   {state.message.splitlines()[0]}")
        out.print(f"  started   {_time(state.start_s)}")
        if state.duration_s is not None:
            out.print(f"  duration  {state.duration_s:.1f} s")
        if state.exit_code is not None:
            out.print(f"  exit code {state.exit_code}")
        out.print(f"  command   {state.entrypoint}")
        for key, value in sorted(state.metadata.items()):
            out.print(f"  {key:<22} {value}")

    @app.command()
    @reports_errors
    def logs(
        submission_id: IdArgument,
        follow: Annotated[
            bool, typer.Option("--follow", "-f", help="stream until the job ends; its outcome")
        ] = False,
        address: AddressOption = None,
        kubernetes: KubernetesOption = False,
        namespace: NamespaceOption = None,
    ) -> None:
        """A job's output so far; with --follow, until it ends (exit code: the job's)."""
        from flows.submit import outcome

        client = _client(address, kubernetes, namespace)
        if follow:
            with _still_running(submission_id, ["--kubernetes"] if kubernetes else []):
                state = client.follow(submission_id, _write)
            outcome(state)
        else:
            text = client.logs(submission_id)
            _write(text)
            if not text and kubernetes:
                err.print(
                    f"note: no output: {submission_id}'s submitter pod has not started, or is "
                    f"gone with its log (kubectl -n {client.namespace} get pods "
                    f"-l job-name={submission_id})"
                )

    @app.command()
    @reports_errors
    def stop(
        submission_id: IdArgument,
        address: AddressOption = None,
        kubernetes: KubernetesOption = False,
        namespace: NamespaceOption = None,
    ) -> None:
        """Stop a running job (on Kubernetes: delete its RayJob and cluster)."""
        stopped = _client(address, kubernetes, namespace).stop(submission_id)
        out.print(f"stopping {submission_id}" if stopped else f"{submission_id} was not running")


def _client(address: str | None, kubernetes: bool, namespace: str | None):
    if kubernetes:
        from flows.submit_kubernetes import KubeRayJobs

        return KubeRayJobs(namespace)
    from flows.submit import RayJobs

    return RayJobs(address)


def _where(client) -> str:
    return getattr(client, "address", None) or f"namespace {client.namespace}"


def _write(text: str) -> None:
    typer.echo(text, nl=False)


def _time(seconds: float | None) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"


@contextmanager
def _still_running(job: str, options: list[str] = ()) -> Iterator[None]:
    """Ctrl-C while following a job stops the following, not the job: say so, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        more = "".join(f" {o}" for o in options)
        print(
            f"interrupted: stopped following; {job} runs on (physflow logs {job} --follow"
            f"{more} follows it again, physflow stop {job}{more} stops it)",
            file=sys.stderr,
        )
        raise typer.Exit(130) from None
