"""`dmtjepa data scenes`: write the seeded scenes benchmark as WebDataset shards."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dmt_jepa.cli.choices import SceneBackground, SceneKind, ScenePalette


def scenes(
    out_dir: Path = typer.Argument(..., help="Directory to write train-*.tar, test-*.tar and scenes.json into."),
    train: int = typer.Option(5000, "--train", help="Number of training scenes."),
    test: int = typer.Option(1000, "--test", help="Number of held-out test scenes."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same scenes."),
    size: int = typer.Option(96, "--size", help="Side of the square scenes in pixels."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Scenes per shard."),
    kind: SceneKind = typer.Option("digits", "--kind", help="Objects: digits (handwritten), shapes (outlines) or textures."),
    background: SceneBackground = typer.Option(
        "photo", "--background", help="Behind the objects: photo (bundled photos) or plain."
    ),
    palette: ScenePalette = typer.Option("colour", "--palette", help="colour (random hues) or mono (black and white on grey)."),
) -> None:
    """Make scenes of objects (digits, shapes or textures) on bundled photos, with image and per-pixel labels."""
    from dmt_jepa.scenes import ScenesError, write_scene_shards
    from dmt_jepa.scenes_cache import progress_lines

    try:
        summary = write_scene_shards(
            out_dir,
            n_train=train,
            n_test=test,
            seed=seed,
            image_size=size,
            shard_size=shard_size,
            kind=kind,
            background=background,
            palette=palette,
            progress=progress_lines(lambda line: typer.echo(line, err=True)),
        )
    except (ScenesError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    for split in ("train", "test"):
        part = summary[split]
        typer.echo(f"{split}: {part['count']} scenes in {len(part['paths'])} shards, per class {part['class_counts']}")
    typer.echo(json.dumps({"out_dir": summary["out_dir"], "train": summary["train"]["count"], "test": summary["test"]["count"]}))
