"""Pack a labelled dataset (VOC, ADE20K, Cityscapes, masks folders, COCO) into the project's labelled shards.

Flow: a reader of `labelled_formats` yields records -> `check_record` checks each (image readable,
mask of its size, labels and boxes declared and inside it) -> a good record becomes one sample
(`__key__`, the image's own bytes, `cls`, `seg.png`, `boxes.json`, `json` naming its source) in
`OUT/{train,test}-NNNNNN.tar`; a bad one becomes one sentence in the report and is left out.
`OUT/dataset.json`, written last, names the classes, the splits' sources and every skipped record.
The invariant: shards are written aside (`.partial`) and renamed only once the whole dataset has
been read, so a refused run (`strict`, or a reader's error) leaves OUT as it was.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dmt_jepa.data.labelled_formats import IGNORE, SPLITS, Problem, Record, check_record, read_dataset
from dmt_jepa.data.shards import DataError

DATASET_FILENAME = "dataset.json"
DATASET_FORMAT = "dmt-jepa labelled shards"
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; any other image becomes PNG


class StrictRefusal(DataError):
    """--strict and at least one record with a problem: nothing was written."""

    def __init__(self, problems: list[Problem]):
        first = problems[0]
        super().__init__(
            f"{len(problems)} record(s) have problems (first: {first.split} {first.name}: {first.sentence}); "
            "nothing was written: fix them, or drop --strict to pack the rest and list them."
        )
        self.problems = problems


@dataclass
class LabelledPackSummary:
    """What `pack_labelled` wrote."""

    out_dir: Path
    counts: dict[str, int]  # split -> samples written
    shards: list[str]
    seg_classes: list[str] | None
    box_classes: list[str] | None
    skipped: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def dominant_class(seg: np.ndarray | None, boxes: list[dict] | None, background: bool) -> int:
    """The image label: the most frequent scored pixel class (background left out where anything else is
    labelled), else the class of the largest box not marked crowd, else 0."""
    if seg is not None:
        counts = np.bincount(seg[seg != IGNORE].ravel(), minlength=1)
        if background and counts[1:].any():
            return 1 + int(np.argmax(counts[1:]))
        if counts.any():
            return int(np.argmax(counts))
    sized = [((b["box"][2] - b["box"][0]) * (b["box"][3] - b["box"][1]), b["digit"]) for b in boxes or () if not b.get("iscrowd")]
    return max(sized)[1] if sized else 0


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_member(record: Record, kind: str) -> tuple[str, bytes]:
    """(extension, bytes): JPEG, PNG and WebP as they are on disk; anything else decoded and written as PNG."""
    if kind in KEPT_FORMATS:
        return KEPT_FORMATS[kind], record.image.read_bytes()
    with Image.open(record.image) as image:
        return "png", _png(np.asarray(image.convert("RGB")))


def _refuse_existing(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; choose an empty output folder.")
    if out.is_dir():
        taken = sorted(out.glob("train-*.tar")) + sorted(out.glob("test-*.tar")) + sorted(out.glob(DATASET_FILENAME))
        if taken:
            raise DataError(f"{out} already holds labelled shards ({taken[0].name}); choose an empty output folder.")


class _SplitWriter:
    """`OUT/{split}-NNNNNN.tar.partial`, a new shard every `shard_size` samples."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.count, self.paths, self.sink = 0, [], None

    def write(self, sample: dict) -> None:
        import webdataset as wds

        if self.count % self.shard_size == 0:
            self.close()
            self.paths.append(self.out / f"{self.split}-{len(self.paths):06d}.tar.partial")
            self.sink = wds.TarWriter(str(self.paths[-1]))
        self.sink.write({"__key__": f"{self.split}-{self.count:07d}", **sample})
        self.count += 1

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None


def pack_labelled(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    fmt: str,
    *,
    annotations: Sequence[str | os.PathLike] = (),
    strict: bool = False,
    ignore_index: int = IGNORE,
    shard_size: int = 1000,
) -> LabelledPackSummary:
    """Read `src` in format `fmt`, check every record, and write the good ones as labelled shards in `out_dir`.

    With `strict`, one problem refuses the run (StrictRefusal lists them all) and nothing is written.
    """
    src, out = Path(src), Path(out_dir)
    if shard_size < 1:
        raise DataError(f"--max-shard-count must be at least 1, got {shard_size}.")
    _refuse_existing(out)
    dataset = read_dataset(fmt, src, annotations=[Path(a) for a in annotations], ignore_index=ignore_index)
    background = bool(dataset.seg_classes) and dataset.seg_classes[0].lower() in ("background", "_background_")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    writers = {split: _SplitWriter(out, split, shard_size) for split in SPLITS}
    problems: list[Problem] = []
    try:
        for record in dataset.records:
            checked = record if isinstance(record, Problem) else check_record(record, dataset.seg_classes, dataset.box_classes)
            if isinstance(checked, (Problem, str)):
                problems.append(checked if isinstance(checked, Problem) else Problem(record.split, record.name, checked))
                continue
            if strict and problems:
                continue  # nothing will be written; keep reading only to list every problem
            kind, _ = checked
            extension, data = _image_member(record, kind)
            sample = {extension: data, "json": json.dumps({"source": record.name}).encode()}
            sample["cls"] = str(dominant_class(record.seg, record.boxes, background)).encode()
            if record.seg is not None:
                sample["seg.png"] = _png(record.seg)
            if record.boxes is not None:
                sample["boxes.json"] = json.dumps(record.boxes).encode()
            writers[record.split].write(sample)
    except BaseException:
        _discard(writers, out if created else None)
        raise
    for writer in writers.values():
        writer.close()
    if strict and problems:
        _discard(writers, out if created else None)
        raise StrictRefusal(problems)
    shards = []
    for writer in writers.values():
        for partial in writer.paths:
            final = partial.with_name(partial.name.removesuffix(".partial"))
            os.replace(partial, final)
            shards.append(str(final))
    summary = LabelledPackSummary(
        out, {s: w.count for s, w in writers.items()}, shards, dataset.seg_classes, dataset.box_classes, problems, dataset.notes
    )
    _write_dataset_file(summary, fmt, src, dataset.split_sources)
    return summary


def _discard(writers: dict[str, _SplitWriter], made: Path | None) -> None:
    """Remove the partial shards, and the output folder where this run made it and it is left empty."""
    for writer in writers.values():
        writer.close()
        for partial in writer.paths:
            partial.unlink(missing_ok=True)
    if made is not None and made.is_dir() and not any(made.iterdir()):
        made.rmdir()


def _write_dataset_file(summary: LabelledPackSummary, fmt: str, src: Path, sources: dict[str, str]) -> None:
    """OUT/dataset.json, aside then renamed: the classes the evaluation names its tables by, and the report."""
    record = {
        "format": DATASET_FORMAT,
        "version": 1,
        "source": {"format": fmt, "path": str(src)},
        "seg_class_names": summary.seg_classes,
        "box_class_names": summary.box_classes,
        "ignore_index": IGNORE,
        "splits": {split: {"source": sources.get(split), "samples": n} for split, n in summary.counts.items()},
        "notes": summary.notes,
        "skipped": [{"split": p.split, "record": p.name, "problem": p.sentence} for p in summary.skipped],
    }
    path = summary.out_dir / DATASET_FILENAME
    aside = path.with_name(path.name + ".partial")
    aside.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(aside, path)
