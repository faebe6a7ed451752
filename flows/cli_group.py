"""What the command modules share: the common arguments, a progress bar, and a group whose
first argument may be a spec instead of a sub-command.

`physflow pbt SPEC` and `physflow nas SPEC` run a job, while `physflow pbt replay ...` and
`physflow nas export ...` are sub-commands of the same group. A click group cannot have
both an optional positional argument and sub-commands (it would read the sub-command's
name as that argument), so a first argument that is not a sub-command name or an option
is taken as the spec of the group's `run` command.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

SpecPath = Annotated[Path, typer.Argument(help="job spec (YAML)", show_default=False)]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a spec key: key.path=value (repeatable)"),
]
StorageOption = Annotated[
    str | None,
    typer.Option("--storage", help="storage root URL [env: PHYSFLOW_STORAGE; default .physflow]"),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(help="Ray cluster [env: RAY_ADDRESS; default: Ray started on this machine]"),
]


def sets(items: list[str] | None) -> list[str]:
    """--set options as typed."""
    return [x for item in items or [] for x in ("--set", item)]


def continue_with(command: list[str], options: list[str] = ()) -> str:
    """The command that continues a stopped job: `command` + `options` as typed here; in a
    job on a Ray cluster (which `physflow submit` started), its submission again, under a
    new id, the options passed on to the job."""
    if not os.environ.get("PHYSFLOW_SUBMISSION_ID"):
        return shlex.join([*command, *options])
    tail = shlex.join(["--", *options]) + " " if options else ""
    spec = "(SPEC: the spec submitted, with the same --set)"
    return f"physflow submit SPEC --submission-id NEW-ID {tail}{spec}"


def model_line(registered: str, model_uri: str | None) -> str:
    """What a job prints of the model it registered: the registry's URI, which `evaluate`
    and `mlflow.pyfunc.load_model` take, and the logged model's."""
    from flows.tracking import registered_uri

    version = registered_uri(registered, model_uri)
    if version is None:
        return f"{model_uri} (registered as {registered!r})"
    return f"{version} (logged as {model_uri})"


def stopped(stop: KeyboardInterrupt) -> str:
    from flows.runtime import Terminated

    return "terminated" if isinstance(stop, Terminated) else "interrupted"


def stop_code(stop: KeyboardInterrupt) -> int:
    """The shell's codes: 128 + SIGTERM (15) or SIGINT (2)."""
    return 143 if stopped(stop) == "terminated" else 130


class OneLineUsage(TyperGroup):
    """The root command: a usage mistake (a missing argument, an option out of range, an
    unknown command) is one line on stderr naming the command, exit 2, as every other
    mistake is; click's own is a usage block of four lines. (`physflow` alone still shows
    the help.)"""

    def make_context(self, *args, **kwargs):
        with _one_line_usage():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage():
            return super().invoke(ctx)


@contextmanager
def _one_line_usage() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        # By class name: typer vendors click in some versions and not in others.
        kinds = {c.__name__ for c in type(exc).__mro__}
        if "UsageError" not in kinds or "NoArgsIsHelpError" in kinds:
            raise
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "physflow"
        print(f"{where}: {exc.format_message()} (see {where} --help)", file=sys.stderr)
        sys.exit(2)


class SpecOrCommand(TyperGroup):
    """`<group> SPEC ...` means `<group> run SPEC ...`; `<group> <command> ...` stays."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


class Progress:
    """A progress bar on stderr, fed by update(done, total[, value]); with `field`, the
    latest value is shown under that name (the loss of a training run, the best score of a
    search). When stderr is not a terminal (a job's log, a pipe), a plain line instead,
    every `every_s` seconds and at the end."""

    def __init__(self, label: str, unit: str, field: str | None = None, every_s: float = 30.0):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        console = Console(stderr=True, highlight=False, soft_wrap=True)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        columns.append(TextColumn(unit))
        if field:
            columns.append(TextColumn(f"{field} {{task.fields[value]}}"))
        columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        self.bar = Bar(*columns, console=console, transient=True, disable=not console.is_terminal)
        self.label, self.unit, self.field, self.every_s = label, unit, field, every_s
        self.lines = not console.is_terminal
        self.task = None
        self.started = self.printed = None

    def __enter__(self):
        self.bar.start()

        def update(done: int, total: int, value: float | None = None) -> None:
            if self.task is None:
                self.task = self.bar.add_task(self.label, total=total, value="-")
                self.started = time.monotonic()
            fields = {} if value is None else {"value": f"{value:.4g}"}
            self.bar.update(self.task, completed=done, total=total, **fields)
            if self.lines:
                self._line(done, total, value)

        return update

    def _line(self, done: int, total: int, value: float | None) -> None:
        now = time.monotonic()
        if done == 0 or (  # nothing done yet: no line (a mistake found then stays one line)
            done < total and self.printed is not None and now - self.printed < self.every_s
        ):
            return
        self.printed = now
        shown = f", {self.field} {value:.4g}" if self.field and value is not None else ""
        print(
            f"{self.label}: {done}/{total} {self.unit}{shown} ({now - self.started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc) -> None:
        self.bar.stop()
