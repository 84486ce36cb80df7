"""`dmtjepa pretrain`, `dmtjepa data pack` and `dmtjepa convert`: parse, validate, call dmt_jepa."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NoReturn

import typer

from dmt_jepa.cli.choices import LabelledFormat
from dmt_jepa.cli.preflight import need_file

data_app = typer.Typer(help="Prepare image shards for training and evaluation.", no_args_is_help=True)


def _fail(err: Exception, code: int = 2) -> NoReturn:
    """One sentence on stderr; exit 2 for input the user can fix, 1 for a run that failed."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code)


def pretrain(
    overrides: list[str] | None = typer.Argument(
        None, help="Config overrides as section.key=value, e.g. optimization.lr=5e-4 data.train='shards/{000..009}.tar'."
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="YAML config file, or a built-in name: demo, vit_b16, vit_l16, vit_h14 (default: demo)."
    ),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue a run: its directory (newest checkpoint) or one checkpoint folder."
    ),
    compile_step: bool = typer.Option(
        False, "--compile", help="torch.compile the training step's forward and loss (optimization.compile=true)."
    ),
) -> None:
    """Pretrain DMT-JEPA on WebDataset shards; with no arguments, a tiny model on built-in scenes (CPU, minutes)."""
    from dmt_jepa.checkpoint_paths import CheckpointError, find_checkpoint
    from dmt_jepa.config import ConfigError, builtin_config_path, load_config
    from dmt_jepa.data.shards import DataError, expand_shards

    is_main = os.environ.get("RANK", "0") == "0"
    try:  # none of these imports torch: a mistyped override or path is answered at once
        checkpoint = find_checkpoint(resume) if resume is not None else None
        path: Path | None
        if config is not None:
            path = builtin_config_path(config) or Path(config)
        elif checkpoint is not None:
            path = checkpoint / "config.yaml"
        else:
            path = builtin_config_path("demo")
            assert path is not None  # demo.yaml ships with the package
        cfg = load_config(path, [*(overrides or []), *(["optimization.compile=true"] if compile_step else [])])
        if cfg.data.train:  # built-in scenes are made by the run itself
            expand_shards(cfg.data.train)
    except ValueError as err:  # ConfigError, CheckpointError, DataError: what the user wrote or pointed at
        # Under torchrun every rank parses the same line and says so once: whichever rank exits first
        # makes torchrun stop the others, so a rank left silent could leave no line at all.
        _fail(err)

    from dmt_jepa.train import TrainingError
    from dmt_jepa.train import pretrain as run_pretrain

    try:
        if is_main:
            where = checkpoint.parent.parent if checkpoint is not None else Path(cfg.run.out_dir)
            typer.echo(f"training in {where} (log: {where / 'log.jsonl'})")
        result = run_pretrain(cfg, resume=resume)
    except (ConfigError, DataError, CheckpointError) as err:
        _fail(err)
    except TrainingError as err:
        _fail(err, code=1)
    if not result.is_main:
        return
    if result.already_complete:
        typer.echo(f"the run in {result.run_dir} is already complete ({result.steps} steps); nothing was changed.")
    typer.echo(f"run directory: {result.run_dir}")
    typer.echo(f"checkpoint:    {result.checkpoint}")
    loss = f", loss {result.loss:.4f}" if math.isfinite(result.loss) else ""
    typer.echo(f"encoder file:  {result.encoder}  (the target encoder after {result.steps} steps{loss})")
    if result.held_out is not None:
        from dmt_jepa.evaluation.closing import closing_line

        typer.echo(f"probe:         {closing_line(result.held_out)}")


def pack(
    image_dir: Path = typer.Argument(
        ...,
        help="Folder of JPEG/PNG/WebP images (first-level subfolders are class labels), or with --format a labelled dataset's root.",
    ),
    out_dir: Path = typer.Argument(
        ..., help="Empty folder for shard-000000.tar, ... (with --format: train-*.tar, test-*.tar, dataset.json)."
    ),
    max_shard_mb: float = typer.Option(500.0, help="Start a new shard after this many megabytes."),
    max_shard_count: int = typer.Option(10_000, help="Start a new shard after this many images."),
    format: LabelledFormat | None = typer.Option(
        None,
        "--format",
        help="A labelled dataset: voc, ade20k, cityscapes, masks (images/ + masks/) or coco; written as labelled shards.",
    ),
    annotations: list[Path] | None = typer.Option(
        None, "--annotations", help="coco: an instances JSON, once per split (default SRC/annotations/instances_*.json)."
    ),
    strict: bool = typer.Option(False, "--strict", help="With --format: refuse the whole run if any record has a problem."),
    ignore_index: int = typer.Option(255, "--ignore-index", help="masks: the mask value of pixels that are not scored."),
) -> None:
    """Pack a folder of images, or with --format a labelled dataset, into WebDataset tar shards."""
    if format is not None:
        from dmt_jepa.cli.pack_labelled_cmd import pack_labelled_command

        return pack_labelled_command(image_dir, out_dir, format, annotations or [], strict, ignore_index, max_shard_count)
    if annotations or strict or ignore_index != 255:
        _fail(ValueError("--annotations, --strict and --ignore-index apply with --format only; add --format or drop them."))
    from dmt_jepa.data.pack import pack_images  # checks both folders before it imports torch
    from dmt_jepa.data.shards import DataError

    if max_shard_mb <= 0 or max_shard_count < 1:
        _fail(ValueError("--max-shard-mb and --max-shard-count must be positive."))
    try:
        summary = pack_images(image_dir, out_dir, max_shard_bytes=int(max_shard_mb * 1e6), max_shard_count=max_shard_count)
    except DataError as err:
        _fail(err)
    for rel, reason in summary.skipped:
        typer.echo(f"skipped {rel}: {reason}", err=True)
    classes = f" in {len(summary.classes)} classes" if summary.classes else ""
    typer.echo(
        f"packed {summary.images} images{classes} into {len(summary.shards)} shards in {out_dir} "
        f"({len(summary.skipped)} unreadable files skipped)"
    )


def convert(
    checkpoint: Path = typer.Argument(..., help="I-JEPA / DMT-JEPA checkpoint (.pth.tar) of the public code."),
    out: Path = typer.Argument(..., help="Encoder file to write (*.safetensors)."),
    which: str = typer.Option("target_encoder", help="Which state dict to convert: target_encoder or encoder."),
    arch: str | None = typer.Option(None, help="Architecture name; default: inferred from the width."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    license: str = typer.Option(
        "cc-by-nc-4.0",
        "--license",
        help="Licence of the weights, recorded in the file (the public I-JEPA weights': CC-BY-NC 4.0).",
    ),
) -> None:
    """Convert a public I-JEPA / DMT-JEPA checkpoint into an encoder file that export and serve take."""
    need_file(checkpoint, "checkpoint", "pass the .pth.tar file that the public I-JEPA / DMT-JEPA code saved")
    if out.exists() and not force:
        _fail(ValueError(f"{out} already exists; pass --force to overwrite it or choose another path."))
    from dmt_jepa.convert import ConvertError, convert_checkpoint

    try:
        info = convert_checkpoint(checkpoint, out, which=which, arch=arch, license=license)
    except ConvertError as err:
        _fail(err)
    typer.echo(
        f"wrote {out}: {info.arch}/{info.patch_size}, {info.embed_dim} wide, trained at {info.img_size[0]}x{info.img_size[1]}, "
        f"licence {license}"
    )


data_app.command("pack")(pack)
