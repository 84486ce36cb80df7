"""The Typer application behind the `dmtjepa` console script.

Each command group lives in its own module of this package and is registered here; commands
parse and validate, then call one function of `dmt_jepa`, `export` or `serve`.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version
from pathlib import Path

import typer
from typer import completion

from dmt_jepa.cli import embed_cmd, eval_cmd, export_cmd, pretrain_cmd, scenes_cmd, viz_cmd
from dmt_jepa.cli.preflight import fail

app = typer.Typer(
    name="dmtjepa",
    help="DMT-JEPA: pretrain a ViT on image shards, export it, and embed images densely.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,  # ours below: Typer's own ends in a traceback where HOME cannot be written
)
completion.completion_init()  # the completion scripts Typer writes call back in Typer's format


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


def _install_completion(ctx: typer.Context, param: typer.CallbackParam, value: bool) -> None:
    """Typer's installer (a script under HOME and a line in the shell's rc file), once HOME is known to take them."""
    if not value or ctx.resilient_parsing:
        return
    home = Path(os.environ.get("HOME") or "~").expanduser()
    advice = "set HOME to your home folder, or run `dmtjepa --show-completion` and save its output where your shell reads it"
    if not home.is_dir() or not os.access(home, os.W_OK | os.X_OK):
        fail(f"cannot install shell completion: HOME ({home}) is not a folder this user can write; {advice}.")
    try:
        completion.install_callback(ctx, param, value)
    except OSError as err:
        fail(f"cannot install shell completion under {home} ({err.strerror or err}); {advice}.")


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the installed dmt-jepa version and exit."
    ),
    install_completion: bool = typer.Option(
        None,
        "--install-completion",
        callback=_install_completion,
        expose_value=False,
        help="Install completion for the current shell.",
    ),  # fmt: skip
    show_completion: bool = typer.Option(
        None,
        "--show-completion",
        callback=completion.show_callback,
        expose_value=False,
        help="Show completion for the current shell, to copy it or customize the installation.",
    ),  # fmt: skip
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
