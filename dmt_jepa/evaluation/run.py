"""Evaluate an encoder file on labelled shards: kNN, linear probe, dense linear segmentation, detection."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dmt_jepa.evaluation.balanced import balanced_miou
from dmt_jepa.evaluation.class_names import class_names_for
from dmt_jepa.evaluation.data import IGNORE_INDEX, EvalDataError, LabelledSet, read_labelled_shards
from dmt_jepa.evaluation.dense import DenseProbe, score_dense_probe, train_dense_probe
from dmt_jepa.evaluation.detection import DetectOptions, build_detector, coco_box_ap, predict, train_detector
from dmt_jepa.evaluation.features import Features, extract_features
from dmt_jepa.evaluation.knn import knn_top1
from dmt_jepa.evaluation.linear import linear_top1
from dmt_jepa.optional import import_extra

TASKS = ("knn", "linear", "dense")


@dataclass
class EvalOptions:
    """Settings of the three protocols."""

    image_size: int | None = None  # None: the size the encoder was trained at
    batch_size: int = 64
    k: int = 20
    temperature: float = 0.07
    c: float = 1.0
    dense_epochs: int = 10
    dense_lr: float = 1e-2
    seed: int = 0


def _seg_classes(*sets: LabelledSet, names: list[str] | None = None) -> int:
    """Number of pixel classes: as many as are named, else one more than the largest label that is not ignored."""
    largest = max(int(np.max(np.where(s == IGNORE_INDEX, 0, s))) for data in sets for s in data.segs)
    if names is not None and largest >= len(names):
        raise EvalDataError(f"the shards hold pixel label {largest}, outside the {len(names)} classes named beside them.")
    return len(names) if names is not None else largest + 1


def evaluate_features(
    tasks: tuple[str, ...],
    train: LabelledSet,
    test: LabelledSet,
    train_features: Features,
    test_features: Features,
    options: EvalOptions,
    *,
    seg_names: list[str] | None = None,
    probes: dict[str, DenseProbe] | None = None,
) -> dict:
    """Run the requested protocols on already extracted features; one result dict per task.

    `seg_names` name the pixel classes (and fix their number); where `probes` is given, the trained
    dense probe is left in it under "dense".
    """
    results = {}
    if "knn" in tasks:
        top1 = knn_top1(
            train_features.pooled,
            torch.from_numpy(train.labels),
            test_features.pooled,
            torch.from_numpy(test.labels),
            k=options.k,
            temperature=options.temperature,
        )
        results["knn"] = {"top1": top1, "k": options.k}
    if "linear" in tasks:
        top1 = linear_top1(
            train_features.pooled,
            torch.from_numpy(train.labels),
            test_features.pooled,
            torch.from_numpy(test.labels),
            c=options.c,
        )
        results["linear"] = {"top1": top1, "c": options.c}
    if "dense" in tasks:
        num_classes = _seg_classes(train, test, names=seg_names)
        probe = train_dense_probe(
            train_features.patches,
            train.segs,
            num_classes=num_classes,
            epochs=options.dense_epochs,
            lr=options.dense_lr,
            seed=options.seed,
        )
        results["dense"] = score_dense_probe(probe, test_features.patches, test.segs)
        if probes is not None:
            probes["dense"] = probe
        # The class-balanced closed-form probe: deterministic, and a constant predictor cannot move it.
        results["dense_balanced"] = balanced_miou(
            train_features.patches, train.segs, test_features.patches, test.segs, num_classes=num_classes
        )
        results["class_names"] = seg_names or [str(c) for c in range(num_classes)]
    return results


def evaluate_encoder(
    encoder_path: str | os.PathLike,
    train_shards: str,
    test_shards: str,
    tasks: tuple[str, ...] = TASKS,
    options: EvalOptions | None = None,
    save_head: str | os.PathLike | None = None,
) -> dict:
    """Load an encoder file and labelled shards, extract frozen features once, and run the protocols.

    Images are resized to one size (`options.image_size`, default the encoder's); dense logits are
    upsampled to each label map's own size and scored there. `save_head` keeps the dense probe as a
    head file (dmt_jepa.evaluation.head) beside its class names and normalisation.
    """
    from dmt_jepa.encoder_file import file_sha256, load_encoder

    options = options or EvalOptions()
    unknown = set(tasks) - set(TASKS)
    assert not unknown, unknown
    start = time.perf_counter()
    encoder, info = load_encoder(encoder_path)
    train, test = read_labelled_shards(train_shards), read_labelled_shards(test_shards)
    # Only knn and linear read the image labels: a dense probe trains on the label maps, and data without a
    # background class (Cityscapes: road) can give every image one dominant class.
    if {"knn", "linear"} & set(tasks) and len(np.unique(train.labels)) < 2:
        raise EvalDataError(f"the training shards {train_shards} hold fewer than two classes; a probe needs at least two.")
    if "dense" in tasks and (train.segs is None or test.segs is None):
        raise EvalDataError("dense evaluation needs a seg.png label map in every sample of both train and test shards.")
    assert save_head is None or "dense" in tasks, "a head is the dense probe"
    names = class_names_for(train_shards)
    size = options.image_size or info.img_size
    size = [size, size] if isinstance(size, int) else list(size)
    train_features = extract_features(encoder, info, train.images, image_size=size, batch_size=options.batch_size)
    test_features = extract_features(encoder, info, test.images, image_size=size, batch_size=options.batch_size)
    probes: dict[str, DenseProbe] = {}
    results = evaluate_features(tasks, train, test, train_features, test_features, options, seg_names=names.seg, probes=probes)
    if save_head is not None:
        from dmt_jepa.evaluation.head import DenseHead
        from dmt_jepa.evaluation.head import save_head as write_head

        probe = probes["dense"]
        head = DenseHead(
            probe.linear.weight.detach(), probe.linear.bias.detach(), probe.mean, probe.std, results["class_names"],
            file_sha256(encoder_path), info.patch_size, info.pixel_mean, info.pixel_std, tuple(size),
            miou=results["dense"]["miou"],
        )  # fmt: skip
        write_head(save_head, head)
    return {
        "encoder": str(encoder_path),
        "arch": info.arch,
        "train": len(train),
        "test": len(test),
        "image_size": size,
        "inference": f"resize to {size[0]}x{size[1]}; dense logits upsampled to each label map's own size and scored there",
        **results,
        **({"head": str(save_head)} if save_head is not None else {}),
        "options": asdict(options),
        "seconds": round(time.perf_counter() - start, 2),
    }


def evaluate_detection(
    encoder_path: str | os.PathLike,
    train_shards: str,
    test_shards: str,
    options: DetectOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train Faster R-CNN on the encoder's pyramid with the train shards' boxes; COCO box AP on the test shards."""
    from dmt_jepa.encoder_file import load_encoder

    options = options or DetectOptions()
    import_extra("pycocotools.cocoeval", "detect", "`dmtjepa eval detect`")  # before any training, not after it
    start = time.perf_counter()
    torch.manual_seed(options.seed)  # the pyramid and heads start from the same weights every run
    encoder, info = load_encoder(encoder_path)
    train, test = read_labelled_shards(train_shards), read_labelled_shards(test_shards)
    if train.boxes is None or test.boxes is None:
        raise EvalDataError(
            "detection needs a boxes.json in every sample of both train and test shards; "
            "write scenes with this version of `dmtjepa data scenes`."
        )
    digits = [b["digit"] for data in (train, test) for boxes in data.boxes for b in boxes]
    if not digits:
        raise EvalDataError("the shards hold no boxes at all; detection needs labelled objects.")
    names = class_names_for(train_shards).boxes
    if names is not None and max(digits) >= len(names):
        raise EvalDataError(f"the shards hold box class {max(digits)}, outside the {len(names)} classes named beside them.")
    num_classes = len(names) if names is not None else max(digits) + 1
    names = names or [str(c) for c in range(num_classes)]
    size = options.image_size or info.img_size[0]
    try:
        model = build_detector(encoder, info, num_classes, options)
    except ValueError as err:
        raise EvalDataError(f"cannot build the detector ({err}).") from err
    losses = train_detector(model, train.images, train.boxes, options, size, log)
    predictions = predict(model, test.images, size)
    scores = coco_box_ap(test.boxes, predictions, [image.shape[:2] for image in test.images], num_classes)
    return {
        "encoder": str(encoder_path),
        "arch": info.arch,
        "train": len(train),
        "test": len(test),
        "image_size": [size, size],
        "inference": f"resize to {size}x{size}; boxes mapped back to each image's own pixels and scored there",
        "class_names": names,
        "detect": {**scores, "final_loss": losses[-1], "steps": len(losses)},
        "options": asdict(options),
        "seconds": round(time.perf_counter() - start, 2),
    }


def result_rows(result: dict) -> list[tuple[str, str]]:
    """(metric, value) pairs for a readable table."""
    rows = [("encoder", result["encoder"]), ("train / test samples", f"{result['train']} / {result['test']}")]
    if "knn" in result:
        rows.append((f"kNN top-1 (k={result['knn']['k']})", f"{result['knn']['top1']:.2f} %"))
    if "linear" in result:
        rows.append(("linear probe top-1", f"{result['linear']['top1']:.2f} %"))
    if "dense" in result:
        rows.append(("dense mIoU", f"{result['dense']['miou']:.2f} %"))
        if "dense_balanced" in result:
            balanced = result["dense_balanced"]
            rows.append(
                ("dense mIoU, class-balanced probe", f"{balanced['miou']:.2f} % (test-set s.e. {balanced['bootstrap_se']:.2f})")
            )
        rows.append(("dense pixel accuracy", f"{result['dense']['pixel_accuracy']:.2f} %"))
    if "detect" in result:
        rows.append(("detection box AP", f"{result['detect']['ap']:.2f}"))
        rows.append(("detection box AP50", f"{result['detect']['ap50']:.2f}"))
        rows.append(("detection box AP75", f"{result['detect']['ap75']:.2f}"))
    rows.append(("seconds", f"{result['seconds']:.1f}"))
    return rows


def per_class_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """(columns, one row per class named by its class name) of the per-class figures; no rows where there are none."""
    names = result.get("class_names")
    if names is None:
        return [], []

    def cell(values: list | None, i: int) -> str:
        value = values[i] if values is not None and i < len(values) else None
        return "-" if value is None else f"{value:.2f}"

    if "detect" in result:
        ap = result["detect"].get("ap_per_class")
        return ["class", "box AP"], [[name, cell(ap, i)] for i, name in enumerate(names)]
    if "dense" in result:
        iou = result["dense"]["iou_per_class"]
        balanced = result.get("dense_balanced", {}).get("iou_per_class")
        return ["class", "IoU %", "IoU %, class-balanced probe"], [
            [name, cell(iou, i), cell(balanced, i)] for i, name in enumerate(names)
        ]
    return [], []
