"""`dmtjepa viz pca|attention|curves`: PNG pictures of an encoder or of a training run."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from dmt_jepa.cli.preflight import need_encoder, need_file
from dmt_jepa.optional import ExtraMissing

app = typer.Typer(help="Draw PNG pictures: PCA of patch embeddings, last-layer attention, training curves.", no_args_is_help=True)

ENCODER = typer.Argument(..., help="Encoder file (.safetensors).")
IMAGE = typer.Argument(..., help="An image file, or a .tar shard (see --index).")
IMAGE_HINT = "give an image file or a .tar shard"
INDEX = typer.Option(0, "--index", help="Which sample of a .tar shard to draw.")
SIZE = typer.Option(None, "--image-size", help="Resize the image to this side first; default the encoder's training size.")


def _fail(error: Exception) -> NoReturn:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code=2)


@app.command()
def pca(
    encoder: Path = ENCODER,
    image: Path = IMAGE,
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write."),
    index: int = INDEX,
    image_size: int = SIZE,
    side: int = typer.Option(256, "--side", help="Side of each panel in pixels."),
) -> None:
    """The image beside the first three principal components of its patch embeddings as RGB."""
    need_encoder(encoder)
    need_file(image, "image", IMAGE_HINT)
    from dmt_jepa.encoder_file import EncoderFileError, load_encoder
    from dmt_jepa.viz import VizError, pca_picture, read_image, save_png

    try:
        model, info = load_encoder(encoder)
        picture = pca_picture(model, info, read_image(image, index), image_size=image_size, side=side)
    except (EncoderFileError, VizError, ExtraMissing) as error:
        _fail(error)
    typer.echo(str(save_png(picture, out)))


@app.command()
def attention(
    encoder: Path = ENCODER,
    image: Path = IMAGE,
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write."),
    query: str = typer.Option(None, "--query", help="Query patch as ROW,COL of the patch grid; default the centre."),
    index: int = INDEX,
    image_size: int = SIZE,
    side: int = typer.Option(160, "--side", help="Side of each panel in pixels."),
) -> None:
    """Last-layer attention of one query patch: per head and averaged over heads."""
    need_encoder(encoder)
    need_file(image, "image", IMAGE_HINT)
    from dmt_jepa.encoder_file import EncoderFileError, load_encoder
    from dmt_jepa.viz import VizError, attention_picture, read_image, save_png

    try:
        cell = tuple(int(v) for v in query.split(",")) if query else None
    except ValueError:
        cell = ()
    if cell is not None and len(cell) != 2:
        _fail(ValueError(f"--query must be ROW,COL (two integers), got {query!r}."))
    try:
        model, info = load_encoder(encoder)
        picture = attention_picture(model, info, read_image(image, index), cell, image_size=image_size, side=side)
    except (EncoderFileError, VizError, ExtraMissing) as error:
        _fail(error)
    typer.echo(str(save_png(picture, out)))


@app.command()
def curves(
    run_dir: Path = typer.Argument(
        ..., help="Run directory holding log.jsonl (or the log file itself), or its TensorBoard folder RUN_DIR/tensorboard."
    ),
    out: Path = typer.Option(None, "--out", "-o", help="PNG file to write; default RUN_DIR/curves.png."),
) -> None:
    """Training loss and learning rate against step."""
    events = any(run_dir.glob("events.out.tfevents*")) if run_dir.is_dir() else run_dir.name.startswith("events.out.tfevents")
    if not events:
        need_file(
            run_dir / "log.jsonl" if run_dir.is_dir() else run_dir,
            "training log",
            "point at a run directory that holds log.jsonl",
        )
    from dmt_jepa.viz import VizError, curves_picture, read_log, save_png

    try:
        picture = curves_picture(read_log(run_dir))
    except (VizError, ExtraMissing) as error:
        _fail(error)
    beside = run_dir.parent if events and run_dir.is_dir() else run_dir  # RUN_DIR/tensorboard: the picture in RUN_DIR
    target = out or (beside / "curves.png" if beside.is_dir() else beside.with_suffix(".png"))
    typer.echo(str(save_png(picture, target)))
