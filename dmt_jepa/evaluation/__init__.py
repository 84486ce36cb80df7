"""Evaluations of an encoder: kNN, linear probe, dense linear segmentation (frozen) and detection.

Names are imported on first use, so that `dmt_jepa.evaluation.data` (the shard reader, no torch)
can check a command's paths before the evaluations themselves are imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmt_jepa.lazy import lazy_attributes

if TYPE_CHECKING:  # the names as the type checker sees them; at run time, __getattr__ imports them
    from dmt_jepa.evaluation.data import EvalDataError, LabelledSet, read_labelled_shards
    from dmt_jepa.evaluation.dense import dense_miou, perfect_patch_miou
    from dmt_jepa.evaluation.detection import DetectOptions, coco_box_ap
    from dmt_jepa.evaluation.features import Features, extract_features
    from dmt_jepa.evaluation.knn import knn_top1
    from dmt_jepa.evaluation.linear import linear_top1
    from dmt_jepa.evaluation.run import TASKS, EvalOptions, evaluate_detection, evaluate_encoder, evaluate_features

_EXPORTS = {
    "EvalDataError": "dmt_jepa.evaluation.data",
    "LabelledSet": "dmt_jepa.evaluation.data",
    "read_labelled_shards": "dmt_jepa.evaluation.data",
    "dense_miou": "dmt_jepa.evaluation.dense",
    "perfect_patch_miou": "dmt_jepa.evaluation.dense",
    "DetectOptions": "dmt_jepa.evaluation.detection",
    "coco_box_ap": "dmt_jepa.evaluation.detection",
    "Features": "dmt_jepa.evaluation.features",
    "extract_features": "dmt_jepa.evaluation.features",
    "knn_top1": "dmt_jepa.evaluation.knn",
    "linear_top1": "dmt_jepa.evaluation.linear",
    "TASKS": "dmt_jepa.evaluation.run",
    "EvalOptions": "dmt_jepa.evaluation.run",
    "evaluate_detection": "dmt_jepa.evaluation.run",
    "evaluate_encoder": "dmt_jepa.evaluation.run",
    "evaluate_features": "dmt_jepa.evaluation.run",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes(__name__, _EXPORTS)
