"""Scene shards rewritten in the layouts real labelled datasets use: Pascal VOC, ADE20K (mmseg), Cityscapes,
images/ + masks/, COCO.

Each writer takes the folder `write_scene_shards` wrote and lays out the same scenes, in the same
order, exactly as that dataset's own tools expect (palette PNGs, split lists, mmseg's shifted
labels, a COCO instances JSON with RLE masks that pycocotools reads). The JPEG layouts (VOC,
ADE20K) also get `reference`: the scene shards with each image replaced by the very JPEG bytes
the dataset holds, so that packed and reference shards hold the same pixels. Cityscapes declares
its own 19 classes whatever the data holds, so its `reference` is the scene shards declaring those.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from dmt_jepa.evaluation.data import _samples, read_labelled_shards
from dmt_jepa.scenes import write_scene_shards

SPLIT_NAMES = {"voc": ("train", "val"), "ade20k": ("training", "validation"), "masks": ("train", "val")}
# cityscapesScripts' labels.py, written out here apart from the reader's table: the label id of each
# train id 0..18 and its name. The scenes' class k is stored as the id whose train id is k.
CITYSCAPES_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_NAMES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
CITYSCAPES_UNLABELED = 0  # an id with no train id: where the scenes ignore a pixel
VOC_PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def scenes(root: Path, n_train: int, n_test: int, image_size: int, seed: int = 0) -> Path:
    write_scene_shards(root, n_train=n_train, n_test=n_test, seed=seed, image_size=image_size, shard_size=max(n_train, n_test))
    return root


def seg_names(scene_dir: Path) -> list[str]:
    return ["background", *json.loads((scene_dir / "scenes.json").read_text())["class_names"]]


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png(array: np.ndarray, palette: list[int] | None = None) -> bytes:
    image = Image.fromarray(array)
    if palette is not None:
        image = image.convert("P")
        image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _splits(scene_dir: Path):
    for split in ("train", "test"):
        yield split, read_labelled_shards(str(scene_dir / f"{split}-*.tar"))


def _write_reference(scene_dir: Path, reference: Path, jpegs: dict[str, bytes]) -> None:
    """The scene shards with each sample's PNG replaced by the JPEG bytes given for its key."""
    import webdataset as wds

    reference.mkdir(parents=True)
    shutil.copy(scene_dir / "scenes.json", reference / "scenes.json")
    for shard in sorted(scene_dir.glob("*.tar")):
        with wds.TarWriter(str(reference / shard.name)) as sink:
            for key, fields in _samples(shard):
                sample = {"__key__": key, **{ext: data for ext, data in fields.items() if ext != "png"}}
                sink.write({**sample, "jpg": jpegs[key]})


def write_voc(scene_dir: Path, root: Path, reference: Path) -> Path:
    """VOC2012 layout: JPEGImages/ID.jpg, SegmentationClass/ID.png (palette), ImageSets/Segmentation/{train,val}.txt."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    jpegs = {}
    for split, data in _splits(scene_dir):
        ids = [f"2007_{split}_{i:06d}" for i in range(len(data))]
        for image_id, key, image, seg in zip(ids, data.keys, data.images, data.segs):
            jpegs[key] = _jpeg(image)
            (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpegs[key])
            (root / "SegmentationClass" / f"{image_id}.png").write_bytes(_png(seg, VOC_PALETTE))
        list_name = "train" if split == "train" else "val"
        (root / "ImageSets/Segmentation" / f"{list_name}.txt").write_text("\n".join(ids) + "\n")
    lines = ["# label:color_rgb:parts:actions"] + [f"{name}:{i},{i},{i}::" for i, name in enumerate(seg_names(scene_dir))]
    (root / "labelmap.txt").write_text("\n".join(lines) + "\n")
    _write_reference(scene_dir, reference, jpegs)
    return root


def write_ade20k(scene_dir: Path, root: Path, reference: Path) -> Path:
    """mmseg's ADEChallengeData2016 layout: labels stored one higher, 0 = other; objectInfo150.txt names them."""
    jpegs = {}
    for (_split, data), folder in zip(_splits(scene_dir), SPLIT_NAMES["ade20k"]):
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for i, (key, image, seg) in enumerate(zip(data.keys, data.images, data.segs)):
            stem = f"ADE_{folder[:5]}_{i:08d}"
            jpegs[key] = _jpeg(image)
            (root / "images" / folder / f"{stem}.jpg").write_bytes(jpegs[key])
            (root / "annotations" / folder / f"{stem}.png").write_bytes(_png(seg + 1))
    rows = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i + 1}\t0.01\t1\t1\t{name}" for i, name in enumerate(seg_names(scene_dir))]
    (root / "objectInfo150.txt").write_text("\n".join(rows) + "\n")
    _write_reference(scene_dir, reference, jpegs)
    return root


def write_cityscapes(scene_dir: Path, root: Path, reference: Path) -> Path:
    """leftImg8bit/{train,val}/CITY/NAME_leftImg8bit.png + gtFine/{...}/CITY/NAME_gtFine_labelIds.png (label ids);
    the training scenes split over two cities, and a test/ split with dummy labels as Cityscapes ships it."""
    ids = np.full(256, CITYSCAPES_UNLABELED, np.uint8)
    ids[: len(CITYSCAPES_IDS)] = CITYSCAPES_IDS
    for (_split, data), folder in zip(_splits(scene_dir), ("train", "val")):
        cities = ("aachen", "bochum") if folder == "train" else ("frankfurt",)
        for i, (image, seg) in enumerate(zip(data.images, data.segs)):
            city = cities[i * len(cities) // len(data)]  # in order: sorted by city then name is the scenes' order
            name = f"{city}_{i:06d}_000019"
            (root / "leftImg8bit" / folder / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / folder / city).mkdir(parents=True, exist_ok=True)
            (root / "leftImg8bit" / folder / city / f"{name}_leftImg8bit.png").write_bytes(_png(image))
            (root / "gtFine" / folder / city / f"{name}_gtFine_labelIds.png").write_bytes(_png(ids[seg]))
    image, seg = data.images[0], data.segs[0]
    for top, suffix, array in (("leftImg8bit", "leftImg8bit", image), ("gtFine", "gtFine_labelIds", np.zeros_like(seg))):
        (root / top / "test" / "berlin").mkdir(parents=True)
        (root / top / "test" / "berlin" / f"berlin_000000_000019_{suffix}.png").write_bytes(_png(array))
    reference.mkdir(parents=True)
    for shard in sorted(scene_dir.glob("*.tar")):
        shutil.copy(shard, reference / shard.name)
    declared = {"format": "dmt-jepa labelled shards", "version": 1, "seg_class_names": CITYSCAPES_NAMES, "box_class_names": None}
    (reference / "dataset.json").write_text(json.dumps(declared))
    return root


def write_masks(scene_dir: Path, root: Path) -> Path:
    """images/{train,val}/NAME.png + masks/{train,val}/NAME.png (greyscale labels), classes.txt."""
    for (_split, data), folder in zip(_splits(scene_dir), SPLIT_NAMES["masks"]):
        (root / "images" / folder).mkdir(parents=True)
        (root / "masks" / folder).mkdir(parents=True)
        for i, (image, seg) in enumerate(zip(data.images, data.segs)):
            (root / "images" / folder / f"scene_{i:05d}.png").write_bytes(_png(image))
            (root / "masks" / folder / f"scene_{i:05d}.png").write_bytes(_png(seg))
    (root / "classes.txt").write_text("\n".join(seg_names(scene_dir)) + "\n")
    return root


def category_id(digit: int) -> int:
    """COCO category ids need not be contiguous: the writer spaces them out to test the remapping."""
    return 10 + 3 * digit


def coco_json(data, split: str, names: list[str], *, masks: bool = True) -> dict:
    """An instances JSON of one split: one annotation per scene box, with an RLE mask of its visible pixels."""
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    for i, (_image, seg, boxes) in enumerate(zip(data.images, data.segs, data.boxes)):
        height, width = seg.shape
        images.append({"id": 1000 + i, "file_name": f"{split}_{i:06d}.png", "height": height, "width": width})
        for box in boxes:
            x0, y0, x1, y1 = box["box"]
            annotation = {
                "id": len(annotations) + 1, "image_id": 1000 + i, "category_id": category_id(box["digit"]),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            }  # fmt: skip
            if masks:
                inside = np.zeros_like(seg, dtype=bool)
                inside[y0:y1, x0:x1] = True
                rle = mask_utils.encode(np.asfortranarray((inside & (seg == 1 + box["digit"])).astype(np.uint8)))
                annotation["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            annotations.append(annotation)
    categories = [{"id": category_id(d), "name": name, "supercategory": "digit"} for d, name in enumerate(names)]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def write_coco(scene_dir: Path, root: Path, *, masks: bool = True) -> Path:
    """COCO layout: annotations/instances_{train,val}2017.json, images in train2017/ and val2017/ (PNG here)."""
    names = json.loads((scene_dir / "scenes.json").read_text())["class_names"]
    (root / "annotations").mkdir(parents=True)
    for split, data in _splits(scene_dir):
        folder = root / ("train2017" if split == "train" else "val2017")
        folder.mkdir()
        for i, image in enumerate(data.images):
            (folder / f"{split}_{i:06d}.png").write_bytes(_png(image))
        record = coco_json(data, split, names, masks=masks)
        (root / "annotations" / f"instances_{folder.name}.json").write_text(json.dumps(record))
    return root
