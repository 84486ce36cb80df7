"""Frozen-feature evaluations of an encoder: kNN, linear probe and dense linear segmentation."""

from dmt_jepa.evaluation.data import EvalDataError, LabelledSet, read_labelled_shards
from dmt_jepa.evaluation.dense import dense_miou, perfect_patch_miou
from dmt_jepa.evaluation.features import Features, extract_features
from dmt_jepa.evaluation.knn import knn_top1
from dmt_jepa.evaluation.linear import linear_top1
from dmt_jepa.evaluation.run import TASKS, EvalOptions, evaluate_encoder, evaluate_features

__all__ = [
    "TASKS",
    "EvalDataError",
    "EvalOptions",
    "Features",
    "LabelledSet",
    "dense_miou",
    "perfect_patch_miou",
    "evaluate_encoder",
    "evaluate_features",
    "extract_features",
    "knn_top1",
    "linear_top1",
    "read_labelled_shards",
]
