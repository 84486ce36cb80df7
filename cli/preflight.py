"""Checks a command makes on its paths before it imports torch, onnxruntime or a job module.

A mistyped path is answered in a moment rather than after seconds of imports. Only the standard
library is used here; the packages check the same files again, in depth, when they open them.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

ENCODER_HINT = "pass the encoder.safetensors that `dmtjepa pretrain` wrote into its run directory"


def fail(message: str, code: int = 2) -> NoReturn:
    """One sentence on stderr; exit 2 for input the user can fix."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def need_path(path: Path, what: str, hint: str) -> None:
    """`path` exists; else one sentence naming `what` it should be and `hint`."""
    if not path.exists():
        fail(f"{what} {path} does not exist; {hint}.")


def need_file(path: Path, what: str, hint: str) -> None:
    """`path` exists and is not a folder; else one sentence naming `what` it should be and `hint`."""
    need_path(path, what, hint)
    if path.is_dir():
        fail(f"{what} {path} is a folder, not a file; {hint}.")


def need_folder(path: Path, what: str, hint: str) -> None:
    """`path` is an existing folder; else one sentence naming `what` it should be and `hint`."""
    need_path(path, what, hint)
    if not path.is_dir():
        fail(f"{what} {path} is not a folder; {hint}.")


def need_encoder(path: Path) -> None:
    need_file(path, "encoder file", ENCODER_HINT)
