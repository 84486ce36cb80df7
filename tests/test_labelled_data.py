"""`data pack --format voc|ade20k|cityscapes|masks|coco`: real layouts written from the scenes, packed, evaluated; hostile records."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from labelled_datasets import (
    CITYSCAPES_NAMES,
    coco_json,
    scenes,
    write_ade20k,
    write_cityscapes,
    write_coco,
    write_masks,
    write_voc,
)
from PIL import Image
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.data.labelled_pack import StrictRefusal, dominant_class, pack_labelled
from dmt_jepa.data.shards import DataError
from dmt_jepa.encoder_file import info_from_encoder, save_encoder
from dmt_jepa.evaluation import EvalOptions, evaluate_encoder, read_labelled_shards
from dmt_jepa.evaluation.data import _samples
from dmt_jepa.evaluation.detection import coco_box_ap
from dmt_jepa.models import VisionTransformer

OPTIONS = EvalOptions(dense_epochs=20, dense_lr=0.05)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """40 train and 20 test scenes at 32 px, the five layouts written from them, and a small random encoder."""
    root = tmp_path_factory.mktemp("labelled")
    scene_dir = scenes(root / "scenes", 40, 20, 32)
    sources = {
        "voc": (write_voc(scene_dir, root / "voc", root / "voc-ref"), root / "voc-ref"),
        "ade20k": (write_ade20k(scene_dir, root / "ade", root / "ade-ref"), root / "ade-ref"),
        "cityscapes": (write_cityscapes(scene_dir, root / "cityscapes", root / "cityscapes-ref"), root / "cityscapes-ref"),
        "masks": (write_masks(scene_dir, root / "masks"), scene_dir),
        "coco": (write_coco(scene_dir, root / "coco"), scene_dir),
    }
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    path = save_encoder(root / "enc.safetensors", encoder, info_from_encoder(encoder, "custom"))
    return {"root": root, "scenes": scene_dir, "sources": sources, "encoder": path, "reference_results": {}}


def _dense(world, folder):
    return evaluate_encoder(world["encoder"], f"{folder}/train-*.tar", f"{folder}/test-*.tar", ("dense",), OPTIONS)


@pytest.mark.parametrize("fmt", ["voc", "ade20k", "cityscapes", "masks", "coco"])
def test_each_layout_packs_to_the_scene_labels_and_evaluates_to_the_same_figures(world, fmt, tmp_path):
    src, reference = world["sources"][fmt]
    summary = pack_labelled(src, tmp_path / "packed", fmt)
    assert summary.counts == {"train": 40, "test": 20} and summary.skipped == []
    for split in ("train", "test"):
        truth = read_labelled_shards(str(world["scenes"] / f"{split}-*.tar"))
        packed = read_labelled_shards(str(tmp_path / "packed" / f"{split}-*.tar"))
        assert all(np.array_equal(a, b) for a, b in zip(truth.segs, packed.segs, strict=True))
        if fmt == "cityscapes":  # class 0 is road, not background: the image label is the most frequent class of all
            assert packed.labels.tolist() == [int(np.argmax(np.bincount(s[s != 255]))) for s in truth.segs]
        else:  # the image label is the dominant pixel class other than background: the scene's class + 1
            assert np.array_equal(packed.labels, truth.labels + 1)
        if fmt == "coco":  # categories 10, 13, 16, ... are remapped to 0, 1, 2, ... and nothing else changes
            assert [[(b["box"], b["digit"]) for b in boxes] for boxes in packed.boxes] == [
                [(b["box"], b["digit"]) for b in boxes] for boxes in truth.boxes
            ]
    if str(reference) not in world["reference_results"]:
        world["reference_results"][str(reference)] = _dense(world, reference)
    expected, result = world["reference_results"][str(reference)], _dense(world, tmp_path / "packed")
    # Cityscapes declares its 19 classes, 8 of which the scenes never use; its reference declares the same 19.
    names = CITYSCAPES_NAMES if fmt == "cityscapes" else ["background", *map(str, range(10))]
    assert result["class_names"] == expected["class_names"] == names
    assert result["dense"] == expected["dense"] and result["dense_balanced"] == expected["dense_balanced"]
    # Not a trivial agreement: the balanced probe finds most digits (labels 1..10), so a shifted label would show.
    assert sum((v or 0) > 0 for v in result["dense_balanced"]["iou_per_class"][1:11]) >= 5
    assert "resize to 32x32" in result["inference"]


def test_packed_coco_boxes_score_ap_100_against_the_scene_boxes(world, tmp_path):
    pack_labelled(world["sources"]["coco"][0], tmp_path / "p", "coco")
    truth = read_labelled_shards(str(world["scenes"] / "test-*.tar"))
    packed = read_labelled_shards(str(tmp_path / "p" / "test-*.tar"))
    predictions = [
        {
            "boxes": np.array([b["box"] for b in boxes]).reshape(-1, 4),
            "scores": np.ones(len(boxes)),
            "labels": np.array([b["digit"] for b in boxes]),
        }
        for boxes in packed.boxes
    ]
    scores = coco_box_ap(truth.boxes, predictions, [s.shape for s in truth.segs], num_classes=10)
    assert scores["ap"] == pytest.approx(100.0)
    present = {b["digit"] for boxes in truth.boxes for b in boxes}
    assert [v is not None for v in scores["ap_per_class"]] == [d in present for d in range(10)]
    assert all(v == pytest.approx(100.0) for v in scores["ap_per_class"] if v is not None)
    declared = json.loads((tmp_path / "p" / "dataset.json").read_text())
    assert declared["box_class_names"] == list(map(str, range(10))) and declared["splits"]["test"]["samples"] == 20


def _damaged_voc(world, root):
    """The VOC copy with five bad records: no mask, a mask of another size, an undeclared label, an RGB mask, no image."""
    voc = shutil.copytree(world["sources"]["voc"][0], root)
    masks = voc / "SegmentationClass"
    (masks / "2007_train_000000.png").unlink()
    Image.open(masks / "2007_train_000001.png").resize((16, 16)).save(masks / "2007_train_000001.png")
    label = np.asarray(Image.open(masks / "2007_train_000002.png")).copy()
    label[0, 0] = 50
    Image.fromarray(label).convert("P").save(masks / "2007_train_000002.png")
    Image.open(masks / "2007_test_000000.png").convert("RGB").save(masks / "2007_test_000000.png")
    with open(voc / "ImageSets/Segmentation/val.txt", "a") as lists:
        lists.write("2007_test_999999\n")
    return voc


def test_bad_records_are_skipped_one_sentence_each_or_refuse_the_run_under_strict(world, tmp_path):
    voc = _damaged_voc(world, tmp_path / "voc")
    summary = pack_labelled(voc, tmp_path / "out", "voc")
    assert summary.counts == {"train": 37, "test": 19}
    said = {p.name: p.sentence for p in summary.skipped}
    assert said == {
        "2007_train_000000": "its image has no mask (2007_train_000000.png is missing)",
        "2007_train_000001": "its mask is 16x16 but its image 32x32",
        "2007_train_000002": "its mask holds label(s) [50] outside the 11 declared classes",
        "2007_test_000000": "its mask 2007_test_000000.png is a RGB image, not a palette or greyscale PNG of class indices",
        "2007_test_999999": "it is listed but has no image",
    }
    report = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert {r["record"] for r in report["skipped"]} == set(said)
    assert len(read_labelled_shards(str(tmp_path / "out" / "train-*.tar"))) == 37

    with pytest.raises(StrictRefusal, match=r"^5 record\(s\) have problems .*nothing was written") as refused:
        pack_labelled(voc, tmp_path / "strict", "voc", strict=True)
    assert len(refused.value.problems) == 5 and not (tmp_path / "strict").exists()
    run = CliRunner().invoke(app, ["data", "pack", str(voc), str(tmp_path / "strict"), "--format", "voc", "--strict"])
    assert run.exit_code == 2 and run.output.count("problem: ") == 5 and not (tmp_path / "strict").exists()


def test_cityscapes_label_ids_map_to_train_ids_and_bad_records_are_one_sentence_each(world, tmp_path):
    # labels.py by hand: id -> train id; every other id (void, parking, guard rail, caravan ...) is ignored, 255.
    by_hand = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
               28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
    tiny = tmp_path / "tiny"
    for top in ("leftImg8bit/train/ulm", "gtFine/train/ulm"):
        (tiny / top).mkdir(parents=True)
    Image.new("RGB", (34, 1)).save(tiny / "leftImg8bit/train/ulm/ulm_000000_000019_leftImg8bit.png")
    Image.fromarray(np.arange(34, dtype=np.uint8)[None]).save(tiny / "gtFine/train/ulm/ulm_000000_000019_gtFine_labelIds.png")
    summary = pack_labelled(tiny, tmp_path / "tiny-out", "cityscapes")
    assert summary.counts == {"train": 1, "test": 0} and summary.seg_classes == CITYSCAPES_NAMES
    (seg,) = read_labelled_shards(str(tmp_path / "tiny-out" / "train-*.tar")).segs
    assert seg.tolist() == [[by_hand.get(i, 255) for i in range(34)]]
    packed = pack_labelled(world["sources"]["cityscapes"][0], tmp_path / "whole", "cityscapes")
    assert packed.notes == ["leftImg8bit/test is left out: Cityscapes' test labels are not public"]

    cityscapes = shutil.copytree(world["sources"]["cityscapes"][0], tmp_path / "cityscapes")
    (cityscapes / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png").unlink()
    image = cityscapes / "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png"
    Image.open(image).resize((16, 16)).save(image)
    labels = cityscapes / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"
    ids = np.asarray(Image.open(labels)).copy()
    ids[0, 0] = 40
    Image.fromarray(ids).save(labels)
    summary = pack_labelled(cityscapes, tmp_path / "out", "cityscapes")
    assert summary.counts == {"train": 38, "test": 19}
    assert {p.name: p.sentence for p in summary.skipped} == {
        "aachen/aachen_000000_000019": "its image has no mask (aachen_000000_000019_gtFine_labelIds.png is missing)",
        "aachen/aachen_000001_000019": "its mask is 32x32 but its image 16x16",
        "frankfurt/frankfurt_000000_000019": "its mask holds label id(s) [40] outside Cityscapes' ids 0..33",
    }
    run = CliRunner().invoke(
        app, ["data", "pack", str(cityscapes), str(tmp_path / "strict"), "--format", "cityscapes", "--strict"]
    )
    assert run.exit_code == 2 and run.output.count("problem: ") == 3 and not (tmp_path / "strict").exists()
    with pytest.raises(DataError, match=r"is not a Cityscapes folder: leftImg8bit/train and gtFine/train are needed"):
        pack_labelled(cityscapes / "gtFine", tmp_path / "o", "cityscapes")


def test_coco_hostile_records_and_crowds(world, tmp_path):
    names = list(map(str, range(10)))
    data = read_labelled_shards(str(world["scenes"] / "test-*.tar"))
    record = coco_json(data, "test", names)
    record["annotations"][0]["bbox"] = [20.0, 20.0, 30.0, 5.0]  # reaches x = 50 in a 32-pixel image
    record["annotations"][1]["category_id"] = 99  # declared by no category
    crowd = next(a for a in record["annotations"] if a["image_id"] == 1002)
    crowd["iscrowd"] = 1
    root = tmp_path / "coco"
    shutil.copytree(world["sources"]["coco"][0] / "val2017", root / "val2017")
    (root / "val2017" / "test_000003.png").unlink()
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(record))
    summary = pack_labelled(root, tmp_path / "out", "coco")
    said = {p.name: p.sentence for p in summary.skipped}
    bad_box = next(img["file_name"] for img in record["images"] if img["id"] == record["annotations"][0]["image_id"])
    undeclared = next(img["file_name"] for img in record["images"] if img["id"] == record["annotations"][1]["image_id"])
    assert said[bad_box] == "a box [20.0, 20.0, 50.0, 25.0] (x0, y0, x1, y1) is empty or outside the 32x32 image"
    assert said[undeclared] == f"annotation {record['annotations'][1]['id']} has category id 99, which no category declares"
    assert said["test_000003.png"].startswith("its image is not in ")
    assert summary.counts == {"train": 0, "test": 20 - len(said)}
    packed = read_labelled_shards(str(tmp_path / "out" / "test-*.tar"))
    sources = [json.loads(fields["json"])["source"] for _, fields in _samples(tmp_path / "out" / "test-000000.tar")]
    crowded = sources.index(next(img["file_name"] for img in record["images"] if img["id"] == crowd["image_id"]))
    boxes = packed.boxes[crowded]
    assert [b["iscrowd"] for b in boxes][0] == 1 and sum(b["iscrowd"] for b in boxes) == 1
    x0, y0, x1, y1 = (int(v) for v in boxes[0]["box"])
    seg = packed.segs[crowded]
    assert (seg[y0:y1, x0:x1] == 255).any()  # the crowd's own pixels are not scored


def test_ade20k_labels_are_reduced_and_masks_take_an_ignore_index(tmp_path):
    ade = tmp_path / "ade"
    for folder in ("images/training", "annotations/training"):
        (ade / folder).mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(ade / "images/training/a.jpg")
    Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8)).save(ade / "annotations/training/a.png")
    pack_labelled(ade, tmp_path / "ade-out", "ade20k")
    (seg,) = read_labelled_shards(str(tmp_path / "ade-out" / "train-*.tar")).segs
    assert seg.tolist() == [[255, 0], [1, 2]]  # 0 = other, ignored; every other label one lower

    masks = tmp_path / "masks"
    for folder in ("images/train", "masks/train", "images/val", "masks/val"):
        (masks / folder).mkdir(parents=True)
    for split in ("train", "val"):
        Image.new("RGB", (2, 2)).save(masks / f"images/{split}/b.png")
        Image.fromarray(np.array([[0, 1], [7, 2]], np.uint8)).save(masks / f"masks/{split}/b.png")
    (masks / "classes.txt").write_text("sky\nroad\ncar\n")
    summary = pack_labelled(masks, tmp_path / "masks-out", "masks", ignore_index=7)
    assert summary.counts == {"train": 1, "test": 1} and summary.seg_classes == ["sky", "road", "car"]
    (seg,) = read_labelled_shards(str(tmp_path / "masks-out" / "test-*.tar")).segs
    assert seg.tolist() == [[0, 1], [255, 2]]
    with_seven = pack_labelled(masks, tmp_path / "masks-255", "masks")  # 7 is then a label, and undeclared
    assert with_seven.counts == {"train": 0, "test": 0}
    assert {p.sentence for p in with_seven.skipped} == {"its mask holds label(s) [7] outside the 3 declared classes"}
    Image.fromarray(np.array([[0, 255], [7, 2]], np.uint8)).save(masks / "masks/val/b.png")
    with_255 = pack_labelled(masks, tmp_path / "masks-reserved", "masks", ignore_index=7)
    assert [p.sentence for p in with_255.skipped] == [
        "its mask holds label 255, which the shards keep for ignored pixels; relabel it or pass --ignore-index 255"
    ]


def test_dominant_class_by_hand():
    seg = np.array([[0, 0, 0, 2], [1, 2, 255, 255]], np.uint8)
    assert dominant_class(seg, None, background=True) == 2  # background left out: 2 twice beats 1 once
    assert dominant_class(seg, None, background=False) == 0
    boxes = [
        {"box": [0, 0, 2, 2], "digit": 4},
        {"box": [0, 0, 5, 5], "digit": 1, "iscrowd": 1},
        {"box": [0, 0, 3, 3], "digit": 6},
    ]
    assert dominant_class(None, boxes, background=True) == 6  # the largest box that is not a crowd


def test_layouts_that_are_not_there_are_one_sentence(world, tmp_path):
    with pytest.raises(DataError, match=r"is not a Pascal VOC folder: JPEGImages is missing"):
        pack_labelled(tmp_path, tmp_path / "o", "voc")
    with pytest.raises(DataError, match="applies to --format coco only"):
        pack_labelled(world["sources"]["voc"][0], tmp_path / "o", "voc", annotations=["x.json"])
    bad = tmp_path / "instances_everything.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match="cannot tell the split of instances_everything.json"):
        pack_labelled(world["sources"]["coco"][0], tmp_path / "o", "coco", annotations=[bad])
    broken = tmp_path / "instances_train.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="is not a COCO instances file pycocotools can read"):
        pack_labelled(world["sources"]["coco"][0], tmp_path / "o", "coco", annotations=[broken])
    pack_labelled(world["sources"]["masks"][0], tmp_path / "done", "masks")
    with pytest.raises(DataError, match="already holds labelled shards"):
        pack_labelled(world["sources"]["masks"][0], tmp_path / "done", "masks")
    run = CliRunner().invoke(app, ["data", "pack", str(tmp_path), str(tmp_path / "o"), "--strict"])
    assert run.exit_code == 2 and "apply with --format only" in run.output


def test_cli_packs_then_evaluates_with_per_class_rows_named_and_json_beside(world, tmp_path):
    runner = CliRunner()
    packed = tmp_path / "packed"
    run = runner.invoke(app, ["data", "pack", str(world["sources"]["voc"][0]), str(packed), "--format", "voc"])
    assert run.exit_code == 0, run.output
    assert "packed 40 train and 20 test samples, 11 classes (background, 0, 1, 2, 3, 4 ...)" in run.output
    args = ["eval", "dense", str(world["encoder"]), str(packed), "--epochs", "2", "--json-out", str(tmp_path / "r.json")]
    run = runner.invoke(app, args)
    assert run.exit_code == 0, run.output
    written = json.loads((tmp_path / "r.json").read_text())
    printed = json.loads(next(line for line in run.output.splitlines() if line.startswith("{")))
    assert written == printed and written["class_names"][0] == "background"
    rows = [line for line in run.output.splitlines() if line.strip("│ ").startswith(("background", "9 "))]
    assert len(rows) == 2 and "per class (resize to 32x32" in run.output
