"""`dmtjepa eval knn|linear|dense|all|detect`: evaluations of an encoder file on labelled shards."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dmt_jepa.cli.preflight import fail, need_encoder, need_folder

app = typer.Typer(help="Evaluate an encoder file on labelled shards (cls and, for dense, seg.png).", no_args_is_help=True)

ENCODER = typer.Argument(..., help="Encoder file (.safetensors).")
DATA = typer.Argument(
    None, help="Directory holding train-*.tar and test-*.tar (as `dmtjepa data scenes` or `data pack --format` writes)."
)
TRAIN = typer.Option(None, "--train", help="Training shards: directory, glob or brace pattern (overrides DATA).")
TEST = typer.Option(None, "--test", help="Test shards: directory, glob or brace pattern (overrides DATA).")
SIZE = typer.Option(None, "--image-size", help="Resize images to this side; default the encoder's training size.")
BATCH = typer.Option(64, "--batch-size", help="Images per forward pass.")
JSON_OUT = typer.Option(None, "--json-out", help="Also write the result (per-class figures included) to this JSON file.")


def _run(
    tasks: tuple[str, ...], encoder: Path, data: Path | None, train: str | None, test: str | None,
    json_out: Path | None = None, save_head: Path | None = None, **options,
) -> None:  # fmt: skip
    """Resolve the shards, evaluate, print one JSON line and the tables; user errors exit with one sentence."""
    from dmt_jepa.evaluation.data import EvalDataError, resolve_shards

    if (train is None or test is None) and data is None:
        fail("give a DATA directory or both --train and --test shard patterns.")
    need_encoder(encoder)
    if train is None or test is None:
        assert data is not None  # refused above without it
        need_folder(data, "DATA", "give the folder `dmtjepa data scenes` wrote, or --train and --test shard patterns")
        train = train or str(data / "train-*.tar")
        test = test or str(data / "test-*.tar")
    try:
        resolve_shards(train), resolve_shards(test)
    except EvalDataError as error:
        fail(str(error))
    for path, flag in ((json_out, "--json-out"), (save_head, "--save-head")):
        if path is not None and not path.parent.is_dir():
            fail(f"{flag} {path}: the folder {path.parent} does not exist; create it or choose another path.")
    if save_head is not None and save_head.exists():
        fail(f"--save-head {save_head} already exists; choose another path or move that file away.")

    from rich.console import Console
    from rich.table import Table

    from dmt_jepa.encoder_file import EncoderFileError
    from dmt_jepa.evaluation import DetectOptions, EvalOptions, evaluate_detection, evaluate_encoder
    from dmt_jepa.evaluation.run import per_class_rows, result_rows
    from dmt_jepa.optional import ExtraMissing

    try:
        if tasks == ("detect",):
            result = evaluate_detection(
                encoder, train, test, DetectOptions(**options), log=lambda line: typer.echo(line, err=True)
            )
        else:
            result = evaluate_encoder(encoder, train, test, tasks, EvalOptions(**options), save_head=save_head)
    except (EncoderFileError, EvalDataError, ExtraMissing) as error:
        fail(str(error))
    typer.echo(json.dumps(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1) + "\n")
    table = Table(title=f"dmtjepa eval {' + '.join(tasks)}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in result_rows(result):
        table.add_row(metric, value)
    Console().print(table)
    columns, rows = per_class_rows(result)
    if rows:
        per_class = Table(title=f"per class ({result['inference']})")
        for i, column in enumerate(columns):
            per_class.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            per_class.add_row(*row)
        Console().print(per_class)


@app.command()
def knn(
    encoder: Path = ENCODER,
    data: Path = DATA,
    train: str = TRAIN,
    test: str = TEST,
    k: int = typer.Option(20, "--k", help="Neighbours that vote."),
    temperature: float = typer.Option(0.07, "--temperature", help="Votes are weighted exp(cosine / T)."),
    image_size: int = SIZE,
    batch_size: int = BATCH,
) -> None:
    """Cosine kNN top-1 on pooled features."""
    _run(("knn",), encoder, data, train, test, k=k, temperature=temperature, image_size=image_size, batch_size=batch_size)


@app.command()
def linear(
    encoder: Path = ENCODER,
    data: Path = DATA,
    train: str = TRAIN,
    test: str = TEST,
    c: float = typer.Option(1.0, "--c", help="Inverse L2 regularisation strength of the logistic regression."),
    image_size: int = SIZE,
    batch_size: int = BATCH,
) -> None:
    """Logistic-regression probe top-1 on pooled features."""
    _run(("linear",), encoder, data, train, test, c=c, image_size=image_size, batch_size=batch_size)


@app.command()
def dense(
    encoder: Path = ENCODER,
    data: Path = DATA,
    train: str = TRAIN,
    test: str = TEST,
    epochs: int = typer.Option(10, "--epochs", help="Passes of the linear pixel classifier over the training set."),
    lr: float = typer.Option(1e-2, "--lr", help="AdamW learning rate of the linear pixel classifier."),
    seed: int = typer.Option(0, "--seed", help="Seed of the classifier's data order."),
    image_size: int = SIZE,
    batch_size: int = BATCH,
    json_out: Path = JSON_OUT,
    save_head: Path = typer.Option(
        None,
        "--save-head",
        help="Keep the trained linear head (class names, normalisation) as a .safetensors file for export --head.",
    ),
) -> None:
    """Linear segmentation: a linear classifier on frozen patch embeddings, logits upsampled, mIoU per class."""
    _run(
        ("dense",), encoder, data, train, test, json_out, save_head,
        dense_epochs=epochs, dense_lr=lr, seed=seed, image_size=image_size, batch_size=batch_size,
    )  # fmt: skip


@app.command()
def detect(
    encoder: Path = ENCODER,
    data: Path = DATA,
    train: str = TRAIN,
    test: str = TEST,
    epochs: int = typer.Option(6, "--epochs", help="Passes over the training images."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate (cosine decay to 0)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per training step."),
    out_channels: int = typer.Option(64, "--channels", help="Width of the feature pyramid."),
    layers: str = typer.Option(
        None, "--layers", help="One block per pyramid level, e.g. 2,5,8,11 (default: every level from the last block)."
    ),
    finetune: bool = typer.Option(False, "--finetune", help="Train the encoder too (default: frozen)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the heads' initialisation and the data order."),
    image_size: int = SIZE,
    json_out: Path = JSON_OUT,
) -> None:
    """Faster R-CNN on the encoder's simple feature pyramid (boxes.json); COCO box AP, AP50, AP75 and AP per class on test."""
    from dmt_jepa.cli.embed_cmd import parse_layers

    chosen = parse_layers(layers)
    _run(
        ("detect",),
        encoder,
        data,
        train,
        test,
        json_out,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        out_channels=out_channels,
        layers=tuple(chosen) if chosen else None,
        finetune=finetune,
        seed=seed,
        image_size=image_size,
    )


@app.command("all")
def all_tasks(
    encoder: Path = ENCODER,
    data: Path = DATA,
    train: str = TRAIN,
    test: str = TEST,
    image_size: int = SIZE,
    batch_size: int = BATCH,
) -> None:
    """kNN, linear probe and dense segmentation with default settings, features extracted once."""
    _run(("knn", "linear", "dense"), encoder, data, train, test, image_size=image_size, batch_size=batch_size)
