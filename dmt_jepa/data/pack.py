"""Pack a folder of images (subfolder = optional class label) into WebDataset tar shards."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dmt_jepa.data.shards import DataError

FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass
class PackSummary:
    """What `pack_images` wrote."""

    images: int
    shards: list[str]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def _image_format(path: Path) -> str:
    """The shard extension of an image file, after checking that PIL can read its header."""
    with Image.open(path) as image:
        kind = image.format
        image.verify()
    if kind not in FORMATS:
        raise ValueError(f"format {kind} is not JPEG, PNG or WebP")
    return FORMATS[kind]


def pack_images(
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 500_000_000,
    max_shard_count: int = 10_000,
) -> PackSummary:
    """Write every JPEG/PNG/WebP under `image_dir` to `out_dir/shard-NNNNNN.tar`, in sorted path order.

    A file directly inside a first-level subfolder tree gets that subfolder's name as its class
    (`cls` = index in the sorted class names, plus the name in `json`); files in `image_dir`
    itself get no class. Unreadable files are skipped and listed in the summary.
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist; pass a folder of JPEG/PNG/WebP images.")
    paths = sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not paths:
        raise DataError(f"{image_dir} holds no .jpg, .jpeg, .png or .webp files; point it at a folder of images.")
    if out_dir.exists() and any(out_dir.glob("shard-*.tar")):
        raise DataError(f"{out_dir} already holds shards; choose an empty output folder so nothing is overwritten.")
    import webdataset as wds  # imports torch: only once the paths are known to be good

    out_dir.mkdir(parents=True, exist_ok=True)

    relative = [p.relative_to(image_dir) for p in paths]
    classes = sorted({r.parts[0] for r in relative if len(r.parts) > 1})
    class_index = {name: i for i, name in enumerate(classes)}
    written: list[str] = []
    skipped: list[tuple[str, str]] = []
    count = 0
    with wds.ShardWriter(str(out_dir / "shard-%06d.tar"), maxcount=max_shard_count, maxsize=max_shard_bytes, verbose=0) as sink:
        for path, rel in zip(paths, relative):
            try:
                ext = _image_format(path)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
                skipped.append((str(rel), str(err)))
                continue
            sample = {"__key__": f"{count:09d}", ext: path.read_bytes()}
            meta = {"source": str(rel)}
            if len(rel.parts) > 1:
                sample["cls"] = str(class_index[rel.parts[0]]).encode()
                meta["label"] = rel.parts[0]
            sample["json"] = json.dumps(meta).encode()
            sink.write(sample)
            count += 1
            if sink.fname and sink.fname not in written:
                written.append(sink.fname)
    return PackSummary(images=count, shards=written, classes=classes, skipped=skipped)
