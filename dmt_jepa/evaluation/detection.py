"""Object detection on labelled shards: torchvision's Faster R-CNN on the encoder's simple feature pyramid.

Flow: shards with `boxes.json` -> images resized to one side S (boxes scaled with them) ->
Faster R-CNN (EncoderBackbone: encoder, frozen by default, + ViTDet pyramid; RPN; RoI heads)
trained with AdamW -> test predictions mapped back to the original pixels -> COCO box AP from
pycocotools' COCOeval, the reference implementation, not a re-derivation.
The invariant: ground truth and predictions meet in the original image's pixel coordinates, so
the score does not depend on the size the detector ran at.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from dmt_jepa.encoder_file import EncoderInfo
from dmt_jepa.models import VisionTransformer
from dmt_jepa.models.pyramid import EncoderBackbone
from dmt_jepa.optional import import_extra

Boxes = list[dict]  # per image: {"box": [x0, y0, x1, y1] in pixels, "digit": class, optional "iscrowd": 1 = ignore}


@dataclass
class DetectOptions:
    """Settings of the detection protocol (defaults: a few minutes for the demo encoder on 2 CPU cores)."""

    image_size: int | None = None  # side the detector runs at; None: the encoder's training size
    epochs: int = 6
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    out_channels: int = 64  # pyramid width; ViTDet uses 256 at ViT-B scale
    layers: tuple[int, ...] | None = None  # one block per level; None: every level from the last block
    finetune: bool = False  # train the encoder too (default: frozen, the protocol's linear-probe analogue)
    seed: int = 0


def build_detector(encoder: VisionTransformer, info: EncoderInfo, num_classes: int, options: DetectOptions) -> FasterRCNN:
    """Faster R-CNN on the encoder's pyramid; anchors 4x each level's stride, 3 aspect ratios, sized for one side S."""
    size = options.image_size or info.img_size[0]
    backbone = EncoderBackbone(
        encoder, out_channels=options.out_channels, layers=options.layers, freeze_encoder=not options.finetune
    )
    sizes = tuple((int(4 * stride),) for stride in backbone.strides)
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    levels = ["0", "1", "2", "3"]
    resolution = 7
    return FasterRCNN(
        backbone,
        min_size=size,
        max_size=size,
        image_mean=list(info.pixel_mean),
        image_std=list(info.pixel_std),
        rpn_anchor_generator=anchors,
        # Small images hold a few objects: fewer proposals and sampled RoIs than COCO's defaults keep
        # a CPU step short without starving the heads.
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        # One sample per RoIAlign bin and 64 sampled RoIs per image: RoIAlign's backward dominates a
        # CPU step, and these settings make it ~8x cheaper than torchvision's (2x2 samples, 512 RoIs).
        box_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=resolution, sampling_ratio=1),
        box_head=TwoMLPHead(options.out_channels * resolution**2, 256),
        box_predictor=FastRCNNPredictor(256, num_classes + 1),  # + background, label 0
        box_batch_size_per_image=64,
        box_detections_per_img=20,
        box_score_thresh=0.01,
    )


def detection_batch(
    images: Sequence[np.ndarray], boxes: Sequence[Boxes] | None, size: int
) -> tuple[list[torch.Tensor], list[dict] | None]:
    """uint8 [H, W, 3] images -> float [3, S, S] in [0, 1] (the detector normalises), and targets scaled alike.

    Target labels are digit + 1: torchvision keeps 0 for the background. Crowd boxes are not
    training targets; COCOeval only uses them to ignore detections that fall on them.
    """
    inputs, targets = [], []
    for i, image in enumerate(images):
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0  # [1, 3, H, W]
        height, width = image.shape[:2]
        if (height, width) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        inputs.append(x[0])
        if boxes is not None:
            scale = torch.tensor([size / width, size / height, size / width, size / height])
            kept = [b for b in boxes[i] if not b.get("iscrowd")]
            xyxy = torch.tensor([b["box"] for b in kept], dtype=torch.float32).reshape(-1, 4) * scale
            labels = torch.tensor([b["digit"] + 1 for b in kept], dtype=torch.int64)
            targets.append({"boxes": xyxy, "labels": labels})
    return inputs, targets if boxes is not None else None


def train_detector(
    model: FasterRCNN,
    images: Sequence[np.ndarray],
    boxes: Sequence[Boxes],
    options: DetectOptions,
    size: int,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """AdamW on every trainable parameter, cosine decay over all steps; returns the loss of each step.

    `log` gets one line per epoch (mean loss, seconds), so a long run shows it is moving.
    """
    generator = torch.Generator().manual_seed(options.seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=options.lr, weight_decay=options.weight_decay)
    steps_per_epoch = math.ceil(len(images) / options.batch_size)
    total = options.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    model.train()
    losses = []
    tic = time.perf_counter()
    for epoch in range(options.epochs):
        order = torch.randperm(len(images), generator=generator).tolist()
        for start in range(0, len(order), options.batch_size):
            batch = order[start : start + options.batch_size]
            inputs, targets = detection_batch([images[i] for i in batch], [boxes[i] for i in batch], size)
            loss = sum(model(inputs, targets).values())  # RPN objectness + box, RoI class + box
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        if log is not None:
            mean = sum(losses[-steps_per_epoch:]) / len(losses[-steps_per_epoch:])
            log(f"detector epoch {epoch + 1}/{options.epochs}: mean loss {mean:.4f}, {time.perf_counter() - tic:.0f} s")
    return losses


@torch.inference_mode()
def predict(model: FasterRCNN, images: Sequence[np.ndarray], size: int, batch_size: int = 32) -> list[dict]:
    """Detections per image in its original pixels: {"boxes": [n, 4] xyxy, "scores": [n], "labels": [n] digits}."""
    model.eval()
    predictions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inputs, _ = detection_batch(chunk, None, size)
        for image, out in zip(chunk, model(inputs)):
            height, width = image.shape[:2]
            scale = torch.tensor([width / size, height / size, width / size, height / size])
            predictions.append(
                {
                    "boxes": (out["boxes"] * scale).numpy(),
                    "scores": out["scores"].numpy(),
                    "labels": (out["labels"] - 1).numpy(),
                }
            )
    return predictions


def coco_box_ap(truth: Sequence[Boxes], predictions: Sequence[dict], sizes: Sequence[tuple[int, int]], num_classes: int) -> dict:
    """COCO box AP, AP50 and AP75 (in %) and AP of each class from pycocotools' COCOeval on in-memory ground truth
    and detections.

    `sizes` are the images' [height, width]; classes are 0 .. num_classes - 1 (COCO ids 1 .. num_classes);
    a class with no ground truth has AP None.
    """
    COCO = import_extra("pycocotools.coco", "detect", "COCO box AP").COCO
    COCOeval = import_extra("pycocotools.cocoeval", "detect", "COCO box AP").COCOeval

    images, annotations, detections = [], [], []
    for image_id, (boxes, predicted, (height, width)) in enumerate(zip(truth, predictions, sizes, strict=True), start=1):
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        for record in boxes:
            x0, y0, x1, y1 = (float(v) for v in record["box"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(record["digit"]) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": int(bool(record.get("iscrowd", 0))),
                }
            )
        for (x0, y0, x1, y1), score, label in zip(predicted["boxes"], predicted["scores"], predicted["labels"]):
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "score": float(score),
                }
            )
    if not annotations:
        raise ValueError("no ground-truth boxes to score against")
    if not detections:  # COCO.loadRes refuses an empty list; no detection means zero precision
        present = {a["category_id"] - 1 for a in annotations if not a["iscrowd"]}
        per_class = [0.0 if c in present else None for c in range(num_classes)]
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "detections": 0, "ap_per_class": per_class}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and its table
        ground = COCO()
        ground.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
        }
        ground.createIndex()
        evaluation = COCOeval(ground, ground.loadRes(detections), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ap, ap50, ap75 = (100.0 * max(float(v), 0.0) for v in evaluation.stats[:3])  # -1 marks "undefined"
    return {"ap": ap, "ap50": ap50, "ap75": ap75, "detections": len(detections), "ap_per_class": _ap_per_class(evaluation)}


def _ap_per_class(evaluation) -> list[float | None]:
    """AP (%) of each category over IoU 0.50:0.95, all areas, 100 detections, as COCOeval.summarize averages it."""
    precision = evaluation.eval["precision"]  # [IoU thresholds, recall points, categories, areas, max detections]
    out = []
    for k in range(precision.shape[2]):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]  # -1: the category has no ground truth
        out.append(round(100.0 * float(values.mean()), 3) if values.size else None)
    return out
