"""The figure that closes a run on the built-in scenes: the trained encoder against its own random init.

Seconds on a CPU: features of the run's train and held-out scenes, the class-balanced closed-form
dense probe (`dmt_jepa.evaluation.balanced`: deterministic, converged) for the per-pixel classes,
and kNN top-1 of each scene's dominant object, for the trained target encoder and for an encoder
of the same architecture that was never trained. The benchmark behind these figures is the study's
(docs/results.md); only a gap to the untrained encoder says that training learned something.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dmt_jepa.encoder_file import EncoderInfo
from dmt_jepa.evaluation.balanced import balanced_miou
from dmt_jepa.evaluation.data import LabelledSet, read_labelled_shards
from dmt_jepa.evaluation.features import extract_features
from dmt_jepa.evaluation.knn import knn_top1
from dmt_jepa.models import VisionTransformer, create_encoder


def held_out_figures(
    encoder: VisionTransformer, info: EncoderInfo, train: LabelledSet, test: LabelledSet, num_classes: int
) -> dict:
    """{semantic_miou, knn_top1} in % of a frozen encoder: probes fitted on `train`, scored on `test`."""
    encoder.eval()
    fit, held = extract_features(encoder, info, train.images), extract_features(encoder, info, test.images)
    dense = balanced_miou(fit.patches, train.segs, held.patches, test.segs, num_classes=num_classes, bootstrap=0)
    top1 = knn_top1(fit.pooled, torch.from_numpy(train.labels), held.pooled, torch.from_numpy(test.labels))
    return {"semantic_miou": round(dense["miou"], 2), "knn_top1": round(top1, 2)}  # both already in %


def compare_with_init(
    encoder: VisionTransformer, info: EncoderInfo, data_dir: str | Path, *, seed: int = 0, max_train: int = 2048
) -> dict:
    """The trained encoder and an untrained one of the same shape on the scenes in `data_dir` (train-*.tar,
    test-*.tar, scenes.json): {"trained": figures, "random_init": figures, "chance_top1", "classes", "scenes"}."""
    data_dir = Path(data_dir)
    summary = json.loads((data_dir / "scenes.json").read_text())
    train = read_labelled_shards(str(data_dir / "train-*.tar"))
    test = read_labelled_shards(str(data_dir / "test-*.tar"))
    if len(train.keys) > max_train:  # the probes' cost stays seconds whatever the run trained on
        train = LabelledSet(
            train.keys[:max_train], train.images[:max_train], train.labels[:max_train], train.segs[:max_train], None
        )
    classes = int(summary["num_seg_classes"])
    device = next(encoder.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        untrained = create_encoder(info.arch, patch_size=info.patch_size, img_size=info.img_size).to(device)
    return {
        "trained": held_out_figures(encoder, info, train, test, classes),
        "random_init": held_out_figures(untrained, info, train, test, classes),
        "chance_top1": round(100.0 / len(np.unique(train.labels)), 2),
        "classes": len(summary["class_names"]),
        "scenes": {"train": len(train.keys), "held_out": len(test.keys)},
    }


def closing_line(figures: dict) -> str:
    """One sentence for the end of a run."""
    t, r = figures["trained"], figures["random_init"]
    return (
        f"on {figures['scenes']['held_out']} held-out scenes: semantic mIoU {t['semantic_miou']:.1f} "
        f"(random init {r['semantic_miou']:.1f}), kNN top-1 {t['knn_top1']:.1f} % "
        f"(random init {r['knn_top1']:.1f} %, chance {figures['chance_top1']:.1f} %)"
    )
