"""Evaluations of an encoder: kNN, linear probe, dense linear segmentation (frozen) and detection."""

from dmt_jepa.evaluation.data import EvalDataError, LabelledSet, read_labelled_shards
from dmt_jepa.evaluation.dense import dense_miou, perfect_patch_miou
from dmt_jepa.evaluation.detection import DetectOptions, coco_box_ap
from dmt_jepa.evaluation.features import Features, extract_features
from dmt_jepa.evaluation.knn import knn_top1
from dmt_jepa.evaluation.linear import linear_top1
from dmt_jepa.evaluation.run import TASKS, EvalOptions, evaluate_detection, evaluate_encoder, evaluate_features

__all__ = [
    "TASKS",
    "DetectOptions",
    "EvalDataError",
    "EvalOptions",
    "Features",
    "LabelledSet",
    "coco_box_ap",
    "dense_miou",
    "evaluate_detection",
    "evaluate_encoder",
    "evaluate_features",
    "extract_features",
    "knn_top1",
    "linear_top1",
    "perfect_patch_miou",
    "read_labelled_shards",
]
