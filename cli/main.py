"""The Typer application behind the `dmtjepa` console script.

Each command group lives in its own module of this package and is registered here; commands
parse and validate, then call one function of `dmt_jepa`, `export` or `serve`.
"""

from __future__ import annotations

import typer

from cli import embed_cmd, eval_cmd, export_cmd, pretrain_cmd, scenes_cmd, viz_cmd

app = typer.Typer(
    name="dmtjepa",
    help="DMT-JEPA: pretrain a ViT on image shards, export it, and embed images densely.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """DMT-JEPA: pretrain a ViT on image shards, export it, and embed images densely."""


@app.command()
def version() -> None:
    """Print the installed dmt-jepa version."""
    from dmt_jepa import __version__

    typer.echo(__version__)


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
    app()


if __name__ == "__main__":
    main()
