"""Labelled datasets as their ecosystems lay them out, read into one kind of record.

Five layouts, each read the way its own tools read it:
- `voc`: Pascal VOC, `JPEGImages/ID.jpg` + `SegmentationClass/ID.png` (palette PNGs whose indices
  are the labels, 255 = ignore), split lists `ImageSets/Segmentation/{train,val}.txt`; class names
  from `labelmap.txt` (CVAT's `name:r,g,b::` lines) or `classes.txt`, else VOC's own 21;
- `ade20k`: mmsegmentation's ADE20K, `images/{training,validation}/*` + `annotations/{...}/*.png`,
  0 = ignore and every other label one lower (mmseg's `reduce_zero_label`); names from
  `objectInfo150.txt` or `classes.txt`;
- `masks`: `images/` + `masks/` paired by file stem, split by `train/`, `val/` (or `test/`)
  subfolders where there are any, `--ignore-index` marking unscored pixels; names from `classes.txt`;
- `cityscapes`: Cityscapes, `leftImg8bit/{train,val}/CITY/NAME_leftImg8bit.png` +
  `gtFine/{...}/CITY/NAME_gtFine_labelIds.png`, label ids mapped to the 19 train ids of
  cityscapesScripts' `labels.py` (every other id ignored); test/ has no public labels and is left out;
- `coco`: COCO `instances_*.json` read with pycocotools: boxes with categories remapped to
  contiguous ids in the order of their ids (names kept), `iscrowd` boxes kept as ignored, and,
  where every annotation has one, instance masks rendered to a semantic map (0 = background).

Every reader yields, per record, either a `Record` in the shards' numbering (ignore = 255) or a
`Problem`: one sentence naming the record and what is wrong with it. The checks that hold for
every format (image readable, mask of the image's size, labels declared, boxes inside the image)
live in `check_record`, so that no format can skip one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dmt_jepa.data.shards import DataError

IGNORE = 255  # the shards' ignore label, as the evaluation reads it
SPLITS = ("train", "test")  # shard prefixes: the dataset's val split is written as test-*.tar
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
FORMATS = ("voc", "ade20k", "cityscapes", "masks", "coco")
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
# (label id, name) of train ids 0..18, as cityscapesScripts' labels.py defines them; every other id is ignored.
CITYSCAPES_TRAIN_IDS = (
    (7, "road"), (8, "sidewalk"), (11, "building"), (12, "wall"), (13, "fence"), (17, "pole"), (19, "traffic light"),
    (20, "traffic sign"), (21, "vegetation"), (22, "terrain"), (23, "sky"), (24, "person"), (25, "rider"), (26, "car"),
    (27, "truck"), (28, "bus"), (31, "train"), (32, "motorcycle"), (33, "bicycle"),
)  # fmt: skip
CITYSCAPES_LAST_ID = 33  # labels.py's ids run 0..33 (-1, license plate, is never written to a labelIds PNG)


@dataclass
class Record:
    """One sample in the shards' numbering, before its image is checked."""

    split: str  # "train" or "test"
    name: str  # how the dataset names it: an id or a path relative to SRC
    image: Path
    seg: np.ndarray | None = None  # [H, W] uint8, IGNORE where unscored
    boxes: list[dict] | None = None  # [{"box": [x0, y0, x1, y1], "digit": class, "iscrowd": 0 or 1}]


@dataclass
class Problem:
    """A record that cannot be packed as it is."""

    split: str
    name: str
    sentence: str


@dataclass
class Dataset:
    """What a reader found: the declared classes, where each split came from, and the records."""

    seg_classes: list[str] | None  # per-pixel class names, index = label; None: not declared
    box_classes: list[str] | None  # detection class names, index = "digit"
    split_sources: dict[str, str]  # split -> the list or folder it was taken from
    records: Iterator[Record | Problem]
    notes: list[str]  # facts about the whole dataset the user should read (a default taken, masks not rendered)


def read_dataset(fmt: str, src: Path, *, annotations: list[Path] = (), ignore_index: int = IGNORE) -> Dataset:
    """The reader of `fmt` on `src`; DataError where the layout itself is not there."""
    assert fmt in FORMATS, fmt
    if not src.is_dir():
        raise DataError(f"{src} is not a folder; give the root of the {fmt} dataset.")
    if fmt == "coco":
        return read_coco(src, list(annotations))
    if annotations:
        raise DataError(f"--annotations applies to --format coco only; the {fmt} layout names its own files.")
    if fmt == "voc":
        return read_voc(src)
    if fmt == "ade20k":
        return read_ade20k(src)
    if fmt == "cityscapes":
        return read_cityscapes(src)
    return read_masks(src, ignore_index)


def check_record(record: Record, classes: list[str] | None, box_classes: list[str] | None) -> tuple[str, tuple[int, int]] | str:
    """(PIL format, (height, width)) of a record's image after every check, or the sentence saying what is wrong."""
    try:
        with Image.open(record.image) as image:
            kind, (width, height) = image.format, image.size
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        return f"its image {record.image.name} is not a readable image ({err})"
    if record.seg is not None:
        if record.seg.shape != (height, width):
            return f"its mask is {record.seg.shape[1]}x{record.seg.shape[0]} but its image {width}x{height}"
        labels = np.unique(record.seg[record.seg != IGNORE])
        if classes is not None and len(labels) and labels[-1] >= len(classes):
            outside = [int(v) for v in labels if v >= len(classes)]
            return f"its mask holds label(s) {outside} outside the {len(classes)} declared classes"
    for box in record.boxes or ():
        x0, y0, x1, y1 = box["box"]
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            return f"a box {[round(v, 2) for v in box['box']]} (x0, y0, x1, y1) is empty or outside the {width}x{height} image"
        if box_classes is not None and not 0 <= box["digit"] < len(box_classes):
            return f"a box has class {box['digit']} outside the {len(box_classes)} declared classes"
    return kind, (height, width)


def _index_mask(path: Path) -> np.ndarray | str:
    """A palette or greyscale PNG's indices [H, W] uint8, or why it is not one."""
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("P", "L"):
                return f"its mask {path.name} is a {mask.mode} image, not a palette or greyscale PNG of class indices"
            return np.asarray(mask)  # the palette's indices, not its colours
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        return f"its mask {path.name} is not a readable image ({err})"


def _class_file(path: Path) -> list[str]:
    """Names one per line (blank lines and # comments skipped); `labelmap.txt`'s `name:colour::` keeps the name."""
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line.split(":")[0].strip() if path.name == "labelmap.txt" else line)
    if not names:
        raise DataError(f"{path} names no classes; write one class name per line.")
    return names


def _ade_object_info(path: Path) -> list[str]:
    """ADE20K's objectInfo150.txt (tab separated: Idx, Ratio, Train, Val, Name): the first name of each row."""
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    try:
        by_index = {int(row[0]): row[-1].split(";")[0].strip() for row in rows}
    except (ValueError, IndexError):
        raise DataError(f"{path} is not ADE20K's objectInfo150.txt (Idx, Ratio, Train, Val, Name per row).") from None
    if sorted(by_index) != list(range(1, len(by_index) + 1)):
        raise DataError(f"{path} does not number its classes 1, 2, 3, ...; fix its Idx column.")
    return [by_index[i] for i in range(1, len(by_index) + 1)]


def _first(src: Path, names: tuple[str, ...]) -> Path | None:
    return next((src / n for n in names if (src / n).is_file()), None)


def _image_for(folder: Path, stem: str) -> Path | None:
    """The image named `stem` with any image suffix in `folder`."""
    return next((folder / f"{stem}{s}" for s in IMAGE_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)


def _paired(
    split: str,
    images: list[tuple[str, Path | None]],
    mask_for: Callable[[str], Path],
    to_labels: Callable[[np.ndarray], np.ndarray | str],
) -> Iterator[Record | Problem]:
    """Records of (name, image) pairs whose mask is `mask_for(name)`, labels mapped by `to_labels` (or why not)."""
    for name, image in images:
        if image is None:
            yield Problem(split, name, "it is listed but has no image")
            continue
        mask_path = mask_for(name)
        if not mask_path.is_file():
            yield Problem(split, name, f"its image has no mask ({mask_path.name} is missing)")
            continue
        mask = _index_mask(mask_path)
        labels = to_labels(mask) if not isinstance(mask, str) else mask
        if isinstance(labels, str):
            yield Problem(split, name, labels)
            continue
        yield Record(split, name, image, seg=labels)


def read_voc(src: Path) -> Dataset:
    """Pascal VOC segmentation: the ids of ImageSets/Segmentation/{train,val}.txt."""
    lists = src / "ImageSets" / "Segmentation"
    for needed in (src / "JPEGImages", src / "SegmentationClass", lists / "train.txt"):
        if not needed.exists():
            raise DataError(f"{src} is not a Pascal VOC folder: {needed.relative_to(src)} is missing.")
    names_file = _first(src, ("labelmap.txt", "classes.txt"))
    classes = _class_file(names_file) if names_file else list(VOC_CLASSES)
    notes = [] if names_file else ["no labelmap.txt or classes.txt: the 21 Pascal VOC classes are assumed"]
    split_files = {"train": lists / "train.txt", "test": lists / "val.txt"}
    split_files = {split: path for split, path in split_files.items() if path.is_file()}

    def records() -> Iterator[Record | Problem]:
        for split, path in split_files.items():
            ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
            images = [(i, _image_for(src / "JPEGImages", i)) for i in ids]
            yield from _paired(split, images, lambda i: src / "SegmentationClass" / f"{i}.png", lambda m: m)

    sources = {split: str(path.relative_to(src)) for split, path in split_files.items()}
    return Dataset(classes, None, sources, records(), notes)


def _reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 (other) is ignored, every other label one lower."""
    labels = mask.astype(np.int16) - 1
    return np.where(labels < 0, IGNORE, labels).astype(np.uint8)


def read_ade20k(src: Path) -> Dataset:
    """ADE20K as mmsegmentation lays it out: images/ and annotations/, each with training/ and validation/."""
    folders = {"train": "training", "test": "validation"}
    if not (src / "images" / "training").is_dir() or not (src / "annotations" / "training").is_dir():
        raise DataError(f"{src} is not an ADE20K folder: images/training and annotations/training are needed.")
    names_file = _first(src, ("objectInfo150.txt", "classes.txt"))
    if names_file is None:
        classes, notes = None, ["no objectInfo150.txt or classes.txt: classes are named by their label"]
    else:
        classes, notes = (_ade_object_info if names_file.name == "objectInfo150.txt" else _class_file)(names_file), []
    present = {split: folder for split, folder in folders.items() if (src / "images" / folder).is_dir()}

    def records() -> Iterator[Record | Problem]:
        for split, folder in present.items():
            files = sorted(p for p in (src / "images" / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            images = [(p.stem, p) for p in files]
            masks = src / "annotations" / folder
            yield from _paired(split, images, lambda stem, masks=masks: masks / f"{stem}.png", _reduce_zero_label)

    return Dataset(classes, None, {s: f"images/{f}" for s, f in present.items()}, records(), notes)


def _cityscapes_train_ids(mask: np.ndarray) -> np.ndarray | str:
    """Cityscapes label ids [H, W] -> train ids 0..18, IGNORE for every id labels.py does not train on."""
    if mask.max(initial=0) > CITYSCAPES_LAST_ID:
        outside = [int(v) for v in np.unique(mask) if v > CITYSCAPES_LAST_ID]
        return f"its mask holds label id(s) {outside} outside Cityscapes' ids 0..{CITYSCAPES_LAST_ID}"
    table = np.full(256, IGNORE, np.uint8)
    for train_id, (label_id, _name) in enumerate(CITYSCAPES_TRAIN_IDS):
        table[label_id] = train_id
    return table[mask]


def read_cityscapes(src: Path) -> Dataset:
    """Cityscapes: leftImg8bit/ and gtFine/, each with {train,val}/CITY/, image and labels paired by NAME."""
    folders = {"train": "train", "test": "val"}
    if not (src / "leftImg8bit" / "train").is_dir() or not (src / "gtFine" / "train").is_dir():
        raise DataError(f"{src} is not a Cityscapes folder: leftImg8bit/train and gtFine/train are needed.")
    present = {split: folder for split, folder in folders.items() if (src / "leftImg8bit" / folder).is_dir()}
    notes = []
    if (src / "leftImg8bit" / "test").is_dir():
        notes.append("leftImg8bit/test is left out: Cityscapes' test labels are not public")

    def records() -> Iterator[Record | Problem]:
        for split, folder in present.items():
            root = src / "leftImg8bit" / folder
            files = sorted(p for p in root.glob("*/*_leftImg8bit.*") if p.suffix.lower() in IMAGE_SUFFIXES)  # by city, name
            images = [(f"{p.parent.name}/{p.stem.removesuffix('_leftImg8bit')}", p) for p in files]
            labels = src / "gtFine" / folder
            yield from _paired(
                split, images, lambda name, labels=labels: labels / f"{name}_gtFine_labelIds.png", _cityscapes_train_ids
            )

    classes = [name for _id, name in CITYSCAPES_TRAIN_IDS]
    return Dataset(classes, None, {s: f"leftImg8bit/{f}" for s, f in present.items()}, records(), notes)


def read_masks(src: Path, ignore_index: int) -> Dataset:
    """images/ and masks/ paired by stem; train/ and val/ (or test/) subfolders are the split."""
    if not (src / "images").is_dir() or not (src / "masks").is_dir():
        raise DataError(f"{src} holds no images/ and masks/ folders; put images in images/ and label PNGs in masks/.")
    if not 0 <= ignore_index <= 255:
        raise DataError(f"--ignore-index must be a label 0..255 of the masks, got {ignore_index}.")
    names_file = _first(src, ("classes.txt",))
    classes = _class_file(names_file) if names_file else None
    notes = [] if names_file else ["no classes.txt: classes are named by their label"]
    subfolders = {"train": ("train",), "test": ("val", "test")}
    splits = {s: next((f for f in folders if (src / "images" / f).is_dir()), None) for s, folders in subfolders.items()}
    if splits["train"] is None:
        splits = {"train": ""}  # no split folders: everything is training data
        notes.append("no images/train and images/val folders: every image is training data (give eval --test shards)")
    splits = {s: f for s, f in splits.items() if f is not None}

    def to_labels(mask: np.ndarray) -> np.ndarray | str:
        if ignore_index == IGNORE:
            return mask
        if (mask == IGNORE).any():  # the shards keep 255 for ignored pixels: a class 255 cannot be stored
            return f"its mask holds label {IGNORE}, which the shards keep for ignored pixels; relabel it or pass --ignore-index {IGNORE}"
        out = mask.copy()
        out[mask == ignore_index] = IGNORE
        return out

    def records() -> Iterator[Record | Problem]:
        for split, folder in splits.items():
            files = sorted(p for p in (src / "images" / folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            images = [(p.relative_to(src / "images").with_suffix("").as_posix(), p) for p in files]
            yield from _paired(split, images, lambda name: src / "masks" / f"{name}.png", to_labels)

    return Dataset(classes, None, {s: f"images/{f}".rstrip("/") for s, f in splits.items()}, records(), notes)


def _coco_split(path: Path) -> str:
    """train for a file named like instances_train2017.json, test for val/test, else refused."""
    stem = path.stem.lower()
    if "train" in stem:
        return "train"
    if "val" in stem or "test" in stem:
        return "test"
    raise DataError(f"cannot tell the split of {path.name}: name the file with train or val in it (instances_train.json).")


def _coco_images_folder(src: Path, path: Path) -> Path:
    """COCO keeps each split's images in SRC/<name after instances_> (train2017/); else SRC/images, else SRC."""
    split_name = path.stem.split("instances_")[-1]
    return next((f for f in (src / split_name, src / "images") if f.is_dir()), src)


def read_coco(src: Path, annotation_files: list[Path]) -> Dataset:
    """COCO detection JSON: every --annotations file (default SRC/annotations/instances_*.json) is one split."""
    from dmt_jepa.optional import import_extra

    COCO = import_extra("pycocotools.coco", "detect", "`dmtjepa data pack --format coco`").COCO
    files = annotation_files or sorted((src / "annotations").glob("instances_*.json"))
    if not files:
        raise DataError(f"{src}/annotations holds no instances_*.json; pass the COCO file with --annotations.")
    by_split: dict[str, Path] = {}
    for path in files:
        if not path.is_file():
            raise DataError(f"annotation file {path} does not exist; pass the COCO instances JSON.")
        split = _coco_split(path)
        if split in by_split:
            raise DataError(f"{by_split[split].name} and {path.name} are both {split} annotations; pass one file per split.")
        by_split[split] = path
    cocos = {split: _load_coco(COCO, path) for split, path in by_split.items()}
    category_ids = sorted({c["id"] for coco in cocos.values() for c in coco.dataset.get("categories", [])})
    if not category_ids:
        raise DataError(f"{files[0]} declares no categories; a COCO file lists them under 'categories'.")
    names = {c["id"]: c["name"] for coco in cocos.values() for c in coco.dataset["categories"]}
    contiguous = {cid: i for i, cid in enumerate(category_ids)}
    annotations = [a for coco in cocos.values() for a in coco.dataset.get("annotations", []) if not a.get("iscrowd")]
    with_masks = bool(annotations) and all(a.get("segmentation") for a in annotations)
    notes = [] if with_masks else ["not every annotation has a segmentation: boxes only, no seg.png"]

    def records() -> Iterator[Record | Problem]:
        for split, coco in cocos.items():
            folder = _coco_images_folder(src, by_split[split])
            for image_id, entry in coco.imgs.items():
                yield _coco_record(split, coco, image_id, entry, folder, contiguous, with_masks)

    seg_classes = ["background", *(names[c] for c in category_ids)] if with_masks else None
    sources = {split: str(path) for split, path in by_split.items()}
    return Dataset(seg_classes, [names[c] for c in category_ids], sources, records(), notes)


def _load_coco(COCO, path: Path):
    """pycocotools' COCO on one file, its prints kept off the terminal; a malformed file is one sentence."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError, OSError) as err:
        raise DataError(f"{path} is not a COCO instances file pycocotools can read ({type(err).__name__}: {err}).") from err


def _coco_record(split, coco, image_id, entry, folder, contiguous, with_masks) -> Record | Problem:
    """One COCO image: its boxes in contiguous ids and, with masks, its semantic map."""
    name = str(entry.get("file_name", image_id))
    image = folder / name
    if not image.is_file():
        return Problem(split, name, f"its image is not in {folder}")
    boxes, height, width = [], entry.get("height"), entry.get("width")
    seg = np.zeros((height, width), np.uint8) if with_masks and height and width else None
    for ann in coco.imgToAnns.get(image_id, []):
        if ann.get("category_id") not in contiguous:
            return Problem(
                split, name, f"annotation {ann.get('id')} has category id {ann.get('category_id')}, which no category declares"
            )
        x, y, w, h = (float(v) for v in ann["bbox"])
        crowd = int(bool(ann.get("iscrowd")))
        boxes.append({"box": [x, y, x + w, y + h], "digit": contiguous[ann["category_id"]], "iscrowd": crowd})
        if seg is not None and ann.get("segmentation"):
            try:
                inside = coco.annToMask(ann).astype(bool)  # later annotations paint over earlier ones
            except (TypeError, ValueError, IndexError, KeyError) as err:
                return Problem(split, name, f"annotation {ann.get('id')} has a segmentation pycocotools cannot render ({err})")
            seg[inside] = IGNORE if crowd else 1 + contiguous[ann["category_id"]]
    return Record(split, name, image, seg=seg, boxes=boxes)
