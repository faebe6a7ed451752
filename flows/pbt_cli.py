"""`physflow pbt` commands (registered on the main app by flows.cli).

    physflow pbt SPEC [--resume] [--set key=value ...]    run (or continue) a search
    physflow pbt replay SOURCE [--member M]                retrain one member's schedule

Both forms live on one command group (`flows.cli_group.SpecOrCommand`): a first argument
that is not a sub-command name is the spec of `run`.
"""

from __future__ import annotations

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
    model_line,
    sets,
    stop_code,
    stopped,
)


def register(app, reports_errors, out, err) -> None:
    """Add this module's commands to `app`."""
    pbt_app = typer.Typer(
        cls=SpecOrCommand,
        help="Population-based training: `physflow pbt SPEC` runs a search "
        "(the same as `pbt run SPEC`); `physflow pbt replay` retrains a member.",
        no_args_is_help=True,
        rich_markup_mode=None,
    )
    app.add_typer(pbt_app, name="pbt")

    @pbt_app.command("run")
    @reports_errors
    def run(
        spec: SpecPath,
        set_: SetOption = None,
        resume: Annotated[
            bool, typer.Option(help="continue the search from its last committed round")
        ] = False,
        storage: StorageOption = None,
        ray_address: RayAddressOption = None,
    ) -> None:
        """Run a population-based search (or random, grid, explore/exploit-only)."""
        from flows.pbt import PbtSpec, run_pbt
        from flows.spec import load_spec
        from flows.storage import Storage

        job = load_spec(PbtSpec, spec, set_ or [])
        root = Storage.from_env(storage).check()
        try:
            with Progress(job.name, "steps", field="best") as update:
                result = run_pbt(job, root, resume, update, ray_address)
        except KeyboardInterrupt as stop:
            again = ["physflow", "pbt", str(spec), *sets(set_)]
            if root.exists(root.join("pbt", job.name, "state.json")):
                told = "the search state is kept; continue with: "
                told += continue_with(again, ["--resume"])
            else:  # stopped before its first round was committed
                told = "before the first ready point: nothing kept; start again with: "
                told += continue_with(again)
            typer.echo(f"{stopped(stop)}: {told}", err=True)
            raise typer.Exit(stop_code(stop)) from None
        resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
        out.print(
            f"searched {job.name} ({job.strategy}, {job.population} members x "
            f"{result.steps} steps{resumed}): {result.steps_trained} steps trained "
            f"in {result.seconds:.1f} s"
        )
        out.print(
            f"  winner    member {result.winner}: {result.metric} = {result.score:.6g} "
            f"({result.exploits} exploits, {result.members_failed} members failed)"
        )
        out.print(f"  overhead  {result.overhead_fraction:.1%} of the population's wall time")
        out.print(f"  run       {result.run_id} (experiment {result.experiment})")
        if result.registered:
            out.print(f"  model     {model_line(result.registered, result.model_uri)}")
        out.print(f"  replay    physflow pbt replay {result.run_id}")

    @pbt_app.command("replay")
    @reports_errors
    def replay(
        source: Annotated[str, typer.Argument(help="run id of a search, or a lineage.json file")],
        member: Annotated[
            int | None, typer.Option(min=0, help="member to replay [default: the winner]")
        ] = None,
        storage: StorageOption = None,
        ray_address: RayAddressOption = None,
    ) -> None:
        """Retrain one member's whole schedule (its ancestors' steps, then its own)."""
        from flows.pbt_replay import replay as run_replay
        from flows.storage import Storage

        root = Storage.from_env(storage).check()
        with Progress("replay", "steps") as update:
            result = run_replay(source, member, root, update, ray_address)
        recorded = (
            f"recorded {result.recorded:.6g}, difference {result.score - result.recorded:.3g}"
            if result.recorded is not None
            else "no recorded score"
        )
        out.print(
            f"replayed member {result.member}: {result.steps} steps in {result.segments} "
            f"segments, {result.metric} = {result.score:.6g} ({recorded}) "
            f"in {result.seconds:.1f} s"
        )
