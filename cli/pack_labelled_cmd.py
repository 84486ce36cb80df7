"""`dmtjepa data pack SRC OUT --format voc|ade20k|cityscapes|masks|coco`: a labelled dataset into labelled shards."""

from __future__ import annotations

from pathlib import Path

import typer

from dmt_jepa.cli.preflight import fail


def pack_labelled_command(
    src: Path, out: Path, fmt: str, annotations: list[Path], strict: bool, ignore_index: int, shard_size: int
) -> None:
    """Pack, print each skipped record in one line and a summary; a refused run exits 2 with one sentence."""
    from dmt_jepa.data.labelled_pack import StrictRefusal, pack_labelled
    from dmt_jepa.data.shards import DataError
    from dmt_jepa.optional import ExtraMissing

    try:
        summary = pack_labelled(
            src, out, fmt, annotations=annotations, strict=strict, ignore_index=ignore_index, shard_size=shard_size
        )
    except StrictRefusal as refusal:
        for problem in refusal.problems:
            typer.echo(f"problem: {problem.split} {problem.name}: {problem.sentence}.", err=True)
        fail(str(refusal))
    except (DataError, ExtraMissing) as err:
        fail(str(err))
    for problem in summary.skipped:
        typer.echo(f"skipped {problem.split} {problem.name}: {problem.sentence}.", err=True)
    for note in summary.notes:
        typer.echo(f"note: {note}.", err=True)
    classes = summary.seg_classes or summary.box_classes
    named = f", {len(classes)} classes ({', '.join(classes[:6])}{' ...' if len(classes) > 6 else ''})" if classes else ""
    typer.echo(
        f"packed {summary.counts['train']} train and {summary.counts['test']} test samples{named} into "
        f"{len(summary.shards)} shards in {out} ({len(summary.skipped)} records skipped, listed in {out / 'dataset.json'})"
    )
