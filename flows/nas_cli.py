"""`physflow nas` commands (registered on the main app by flows.cli).

    physflow nas <spec> [--resume] [--set key=value]     search (the default command)
    physflow nas export <run id> --pick N                 a front sub-network as a module

Both forms live on one command group (`flows.cli_group.SpecOrCommand`): a first argument
that is not a sub-command name is the spec of `run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_group import (
    Progress,
    RayAddressOption,
    SetOption,
    SpecOrCommand,
    SpecPath,
    StorageOption,
    continue_with,
    sets,
    stop_code,
    stopped,
)


def register(app, reports_errors, out, err) -> None:
    """Add this module's commands to `app`."""
    nas_app = typer.Typer(
        cls=SpecOrCommand,
        help="Search a super-network's sub-networks: `physflow nas <spec>`, then export one.",
        no_args_is_help=True,
        rich_markup_mode=None,
    )
    app.add_typer(nas_app, name="nas")

    @nas_app.command("run")
    @reports_errors
    def run(
        spec: SpecPath,
        set_: SetOption = None,
        resume: Annotated[
            bool, typer.Option(help="continue the search; nothing is validated twice")
        ] = False,
        storage: StorageOption = None,
        ray_address: RayAddressOption = None,
    ) -> None:
        """Search a super-network's sub-networks (trains the super-network if none is given)."""
        from flows.nas import NASSpec, run_nas
        from flows.spec import load_spec
        from flows.storage import Storage

        job = load_spec(NASSpec, spec, set_ or [])
        root = Storage.from_env(storage).check()
        try:
            with (
                Progress(f"super-network {job.supernet.kind}", "epochs") as training,
                Progress(f"search {job.name}", "validations") as searching,
            ):
                result = run_nas(job, root, resume, searching, training, ray_address)
        except KeyboardInterrupt as stop:
            from flows.nas import SearchFolder

            again = ["physflow", "nas", str(spec), *sets(set_)]
            if SearchFolder.of(root, job.name).state() is None:  # still on the super-network
                told = "before the search began: nothing kept; start again with: "
                told += continue_with(again)
            else:
                told = "every finished validation is kept; continue with: "
                told += continue_with(again, ["--resume"])
            typer.echo(f"{stopped(stop)}: {told}", err=True)
            raise typer.Exit(stop_code(stop)) from None
        replayed = f", {result.new} new" if result.new != result.validated else ""
        failed = f", {result.failed} failed" if result.failed else ""
        out.print(
            f"validated {result.validated} sub-networks{replayed}{failed} in "
            f"{result.seconds:.1f} s; hypervolume {result.hypervolume:.4f}"
        )
        _print_front(out, result.front, result.objectives)
        out.print(f"  results  {result.folder}")
        out.print(f"  run      {result.run_id} (experiment nas)")
        out.print(f"  export   physflow nas export {result.run_id} --pick 1")

    @nas_app.command("export")
    @reports_errors
    def export(
        run_id: Annotated[str, typer.Argument(help="run id of a search", show_default=False)],
        pick: Annotated[int, typer.Option(min=1, help="front entry, numbered as printed")],
        out_path: Annotated[
            Path | None, typer.Option("--out", help="also save the module to this file")
        ] = None,
        storage: StorageOption = None,
    ) -> None:
        """Save a front sub-network as a standalone torch module (torch.load to use it)."""
        from flows.nas import export_subnet
        from flows.storage import Storage

        result = export_subnet(
            run_id, pick, Storage.from_env(storage), str(out_path) if out_path else None
        )
        measures = ", ".join(f"{k} {v:.4g}" for k, v in result.measures.items())
        out.print(f"exported pick {result.pick}: {result.config} ({result.params} params)")
        out.print(f"  measured {measures}")
        out.print(f"  saved    {result.path}")


def _print_front(out, front: list[dict], objectives: list[str]) -> None:
    from rich.table import Table

    table = Table("pick", *objectives, "sub-network", title="Pareto front", title_justify="left")
    for row in front:
        table.add_row(
            str(row["pick"]),
            *(f"{row[o]:.4g}" for o in objectives),
            " ".join(f"{k}={v}" for k, v in row["config"].items()),
        )
    out.print(table)
