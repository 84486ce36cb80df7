"""The study: paired differences and the validation choice by hand; a smoke run of every stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from benchmarks.study import (
    DEFAULT_ARM,
    StudyConfig,
    _miou_of,
    bootstrap_paired_se,
    paired_differences,
    run_study,
    select_default,
)
from dmt_jepa.evaluation.dense import iou_per_class


def _run(seed, fg, fg_val=0.0):
    split = lambda v: {"fg": {"miou": v, "bg_iou": v, "fg_iou": v}, "dense": {"miou": 1.0}}  # noqa: E731
    return {"seed": seed, "target": {"test": split(fg), "val": split(fg_val)},
            "secondary": {"fg_sgd": {"miou": 1.0}, "knn": {"top1": 2.0}, "linear": {"top1": 3.0}}}


def test_paired_differences_by_hand() -> None:
    results = {"i-jepa": [_run(0, 50.0), _run(1, 52.0), _run(2, 51.0)], "dmt": [_run(0, 53.0), _run(1, 53.0), _run(5, 99.0)]}
    d = paired_differences(results)["dmt"]
    assert d["seeds"] == [0, 1]  # seed 5 has no I-JEPA partner and is left out
    assert d["fg"]["per_seed"] == [3.0, 1.0]
    assert d["fg"]["mean"] == pytest.approx(2.0)
    assert d["fg"]["se"] == pytest.approx(math.sqrt(2.0) / math.sqrt(2))  # stdev of (3, 1) over sqrt(2)
    assert d["dense"]["mean"] == 0.0


def test_the_default_is_chosen_on_validation_not_test() -> None:
    results = {"i-jepa": [_run(0, 50.0, 50.0), _run(1, 50.0, 50.0)],
               "a": [_run(0, 60.0, 49.0), _run(1, 60.0, 49.0)],  # far ahead on test, behind on validation
               "b": [_run(0, 40.0, 51.0), _run(1, 40.0, 52.0)]}
    assert select_default(paired_differences(results), ["a", "b"])["arm"] == "b"
    results.pop("b")
    assert select_default(paired_differences(results), ["a"])["arm"] == "i-jepa"
    # An arm on fewer seeds does not compete with the best-covered ones, however far ahead its mean.
    results["c"] = [_run(0, 40.0, 60.0)]
    results["b"] = [_run(0, 40.0, 51.0), _run(1, 40.0, 52.0)]
    choice = select_default(paired_differences(results), ["a", "b", "c"])
    assert choice["arm"] == "b" and "over 2 seeds" in choice["reason"]


def test_miou_of_summed_confusions_matches_iou_per_class() -> None:
    confusion = np.random.default_rng(0).integers(0, 50, size=(3, 4, 4))
    expected = [100 * np.nanmean(iou_per_class(c)) for c in confusion]
    assert np.allclose(_miou_of(confusion), expected)


def test_paired_bootstrap_cancels_what_both_arms_share(tmp_path) -> None:
    """Resampling the same scenes for both arms: identical arms differ by exactly 0 in every resample."""
    rng = np.random.default_rng(0)
    (tmp_path / "jobs").mkdir()
    shared = rng.integers(0, 100, size=(2, 300, 2, 2))
    for arm, conf in (("a", shared), ("b", shared), ("c", rng.integers(0, 100, size=(2, 300, 2, 2)))):
        for seed in (0, 1):
            np.savez(tmp_path / "jobs" / f"{arm}-seed{seed}-confusions.npz", target_fg=conf[seed])
    assert bootstrap_paired_se(tmp_path, "a", [0, 1], baseline="b", samples=50) == 0.0
    alone = bootstrap_paired_se(tmp_path, "c", [0, 1], baseline=None, samples=200)
    assert 0.0 < alone < bootstrap_paired_se(tmp_path, "c", [0, 1], baseline="b", samples=200) * 2


@pytest.mark.slow
def test_study_smoke_two_seeds_few_steps(tmp_path) -> None:
    cfg = StudyConfig(
        seeds=[0, 1], ablation_seeds=[0, 1], control_seeds=[0], steps=4, batch_size=4, arch="vit_nano", patch_size=8,
        image_size=48, pred_width=32, pred_depth=1, min_keep=4, train_scenes=24, val_scenes=8, test_scenes=12,
        dense_epochs=1, workers=1, locality_every=2, locality_images=4, ablations=["dmt-jepa-no-context"], bootstrap=20,
    )
    report = tmp_path / "docs" / "results.md"
    summary = run_study(cfg, tmp_path / "run", report, "python benchmarks/study.py --smoke", reduced=True)
    assert cfg.arms == ["i-jepa", DEFAULT_ARM, "dmt-jepa"] and DEFAULT_ARM == "mean-pool"  # the default, the paper's head
    arms = {"i-jepa", DEFAULT_ARM, "dmt-jepa", "dmt-jepa-no-context", "random"}
    assert set(summary["table"]) == arms and set(summary["paired"]) == arms - {"i-jepa"}
    for arm, row in summary["table"].items():
        for name in ("fg", "fg_val", "dense"):
            mean, std = row[name]
            assert 0.0 <= mean <= 100.0 and std >= 0.0
        assert ("within_image_share_final" in row) == (arm != "random")
        assert ("fg_context" in row) == (arm in cfg.arms)  # encoders compared on the main arms
        assert ("fg_sgd" in row) == (arm != "dmt-jepa-no-context")  # secondary figures: main arms and controls
    assert set(summary["spread"]) == {"target", "context", "average"}
    assert set(summary["ablation_table"]) == {"i-jepa", DEFAULT_ARM, "dmt-jepa", "dmt-jepa-no-context"}
    assert all(se >= 0 for se in summary["test_set_se"].values())
    assert 0 < summary["ceiling"]["dense"] <= summary["ceiling"]["fg"] <= 100
    log = [json.loads(l) for l in (tmp_path / "run" / f"{DEFAULT_ARM}-seed0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4] and all("loss" in r for r in log[1:])
    assert [r["step"] for r in log if "cos_to_own_patch" in r] == [0, 2, 4]
    text = report.read_text()
    assert "Reduced run" in text and "| I-JEPA (aggregation none) |" in text and "python benchmarks/study.py --smoke" in text
    assert "Paired differences" in text and "Ablations" in text and "Choice on the validation split" in text
    for arm in ("i-jepa", DEFAULT_ARM, "random"):
        assert Image.open(report.parent / "results" / f"{arm}-pca.png").size == (384, 192)
        assert f"results/{arm}-attention.png" in text
    assert Image.open(report.parent / "results" / "i-jepa-curves.png").size == (900, 300)
    # every job left its record: summarising again trains nothing and gives the same tables
    again = run_study(cfg, tmp_path / "run", None, "again", run=False)
    assert again["table"] == summary["table"] and json.dumps(again["paired"]) == json.dumps(summary["paired"])
