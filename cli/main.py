"""The Typer application behind the `dmtjepa` console script.

Each command group lives in its own module of this package and is registered here; commands
parse and validate, then call one function of `dmt_jepa`, `export` or `serve`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version

import typer

from dmt_jepa.cli import embed_cmd, eval_cmd, export_cmd, pretrain_cmd, scenes_cmd, viz_cmd

app = typer.Typer(
    name="dmtjepa",
    help="DMT-JEPA: pretrain a ViT on image shards, export it, and embed images densely.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def installed_version() -> str:
    """The version pip installed (the distribution's metadata), else the source tree's own."""
    try:
        return distribution_version("dmt-jepa")
    except PackageNotFoundError:  # run from a source checkout that was never installed
        from dmt_jepa import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(installed_version())
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the installed dmt-jepa version and exit."
    ),
) -> None:
    """DMT-JEPA: pretrain a ViT on image shards, export it, and embed images densely."""


@app.command()
def version() -> None:
    """Print the installed dmt-jepa version."""
    typer.echo(installed_version())


app.add_typer(eval_cmd.app, name="eval")
app.add_typer(viz_cmd.app, name="viz")
app.command("export")(export_cmd.export)
app.command("info")(export_cmd.info)
app.command("embed")(embed_cmd.embed)
app.command("pretrain")(pretrain_cmd.pretrain)
app.command("convert")(pretrain_cmd.convert)
pretrain_cmd.data_app.command("scenes")(scenes_cmd.scenes)
app.add_typer(pretrain_cmd.data_app, name="data")


def main() -> None:
    # Named as the console script is, so that `python -m dmt_jepa.cli.main` completes and reports as `dmtjepa`.
    app(prog_name="dmtjepa")


if __name__ == "__main__":
    main()
