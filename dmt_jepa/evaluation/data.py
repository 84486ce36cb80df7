"""Labelled WebDataset shards read into memory for evaluation."""

from __future__ import annotations

import glob
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
IGNORE_INDEX = 255  # pixels with this label are not scored (the usual segmentation convention)


class EvalDataError(ValueError):
    """Shards that cannot be evaluated on; the message is one sentence for the user."""


@dataclass
class LabelledSet:
    """Images with an image label each and, where the shards have them, per-pixel labels and boxes."""

    keys: list[str]
    images: list[np.ndarray]  # each [H, W, 3] uint8
    labels: np.ndarray  # [N] int64
    segs: list[np.ndarray] | None  # each [H, W] uint8, or None when any sample lacks seg.png
    # per image [{"box": [x0, y0, x1, y1], "digit": class}], or None when any sample lacks boxes.json
    boxes: list[list[dict]] | None = None

    def __len__(self) -> int:
        return len(self.keys)


def resolve_shards(pattern: str) -> list[Path]:
    """Shard paths from a directory (all *.tar in it), a glob, or a brace pattern like a-{000..009}.tar."""
    from braceexpand import braceexpand

    path = Path(pattern)
    if path.is_dir():
        found = sorted(path.glob("*.tar"))
    else:
        found = sorted({Path(p) for part in braceexpand(pattern) for p in glob.glob(part)})
    if not found:
        raise EvalDataError(f"no shards match {pattern}; give a directory of .tar shards, a glob or a brace pattern.")
    return found


def _decode(data: bytes, mode: str, what: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert(mode))
    except (UnidentifiedImageError, OSError) as err:
        raise EvalDataError(f"{what} is not a readable image ({err}); repair or remove that sample.") from err


def _samples(shard: Path):
    """Yield (key, {extension: bytes}) from one tar shard, grouping members by key."""
    key, fields = None, {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, _, extension = base.partition(".")
                member_key = f"{directory}/{stem}" if directory else stem
                if member_key != key and key is not None:
                    yield key, fields
                    fields = {}
                key = member_key
                fields[extension.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise EvalDataError(f"shard {shard} is truncated or not a tar file ({err}); rewrite it.") from err
    if key is not None:
        yield key, fields


def read_labelled_shards(pattern: str) -> LabelledSet:
    """Read every sample of the matching shards: an image, its `cls` label and, if present, `seg.png` and `boxes.json`."""
    keys, images, labels, segs, boxes = [], [], [], [], []
    for shard in resolve_shards(pattern):
        for key, fields in _samples(shard):
            what = f"sample {key} of {shard}"
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in fields), None)
            if image_ext is None or "cls" not in fields:
                raise EvalDataError(f"{what} lacks an image or a cls label; evaluation needs labelled shards.")
            try:
                labels.append(int(fields["cls"].decode().strip()))
            except ValueError:
                raise EvalDataError(f"{what} has a cls that is not an integer; fix the shard.") from None
            keys.append(key)
            images.append(_decode(fields[image_ext], "RGB", what))
            segs.append(_decode(fields["seg.png"], "L", what) if "seg.png" in fields else None)
            if segs[-1] is not None and segs[-1].shape != images[-1].shape[:2]:
                raise EvalDataError(f"{what} has a seg.png of another size than its image; fix the shard.")
            boxes.append(_boxes(fields["boxes.json"], what) if "boxes.json" in fields else None)
    has_segs = all(s is not None for s in segs)
    has_boxes = all(b is not None for b in boxes)
    return LabelledSet(keys, images, np.asarray(labels, dtype=np.int64), segs if has_segs else None, boxes if has_boxes else None)


def _boxes(data: bytes, what: str) -> list[dict]:
    """A boxes.json member: a list of {"box": [x0, y0, x1, y1], "digit": class} with x0 < x1, y0 < y1."""
    try:
        boxes = json.loads(data)
        for record in boxes:
            x0, y0, x1, y1 = (float(v) for v in record["box"])
            if not (x0 < x1 and y0 < y1) or int(record["digit"]) < 0:
                raise ValueError(f"empty box or negative class in {record}")
    except (ValueError, TypeError, KeyError) as err:
        raise EvalDataError(f"{what} has a boxes.json that is not a list of boxes ({err}); fix the shard.") from err
    return boxes


def image_from_shard(shard: str | Path, index: int) -> np.ndarray:
    """The RGB image of sample `index` (0-based, in tar order) of one shard."""
    for i, (key, fields) in enumerate(_samples(Path(shard))):
        if i == index:
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in fields), None)
            if image_ext is None:
                raise EvalDataError(f"sample {key} of {shard} holds no image.")
            return _decode(fields[image_ext], "RGB", f"sample {key} of {shard}")
    raise EvalDataError(f"{shard} has fewer than {index + 1} samples; choose a smaller index.")
