"""Smoke run of the study: one seed, a few steps, every arm evaluated and the report written."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from benchmarks.study import DEFAULT_ARM, StudyConfig, paired_differences, run_study


def test_paired_differences_by_hand() -> None:
    def run(seed, fg):
        return {"seed": seed, "figure_ground": {"miou": fg}, "dense": {"miou": 1.0}, "knn": {"top1": 2.0}, "linear": {"top1": 3.0}}

    results = {"i-jepa": [run(0, 50.0), run(1, 52.0), run(2, 51.0)], "dmt": [run(0, 53.0), run(1, 53.0), run(5, 99.0)]}
    d = paired_differences(results)["dmt"]
    assert d["seeds"] == [0, 1]  # seed 5 has no I-JEPA partner and is left out
    assert d["fg"]["per_seed"] == [3.0, 1.0]
    assert d["fg"]["mean"] == pytest.approx(2.0)
    assert d["fg"]["se"] == pytest.approx(math.sqrt(2.0) / math.sqrt(2))  # stdev of (3, 1) over sqrt(2)
    assert d["dense"]["mean"] == 0.0


@pytest.mark.slow
def test_study_smoke_one_seed_few_steps(tmp_path) -> None:
    cfg = StudyConfig(
        seeds=[0], control_seeds=[0], steps=3, batch_size=4, arch="vit_nano", patch_size=8, image_size=48,
        pred_width=32, pred_depth=1, min_keep=4, train_scenes=24, test_scenes=12, dense_epochs=1, workers=1,
        locality_every=2, locality_images=4, controls=["dmt-jepa-mean", "random"],
    )
    report = tmp_path / "docs" / "results.md"
    summary = run_study(cfg, tmp_path / "run", report, "python benchmarks/study.py --smoke", reduced=True)
    arms = {"i-jepa", DEFAULT_ARM, "dmt-jepa-mean", "random"}
    assert set(summary["table"]) == arms and set(summary["paired"]) == arms - {"i-jepa"}
    for arm, row in summary["table"].items():
        for metric in ("knn", "linear", "dense", "fg"):
            mean, std = row[metric]
            assert 0.0 <= mean <= 100.0 and std == 0.0
        assert ("within_image_share_final" in row) == (arm != "random")
    assert 0 < summary["ceiling"]["dense"] <= summary["ceiling"]["fg"] <= 100
    log = [json.loads(l) for l in (tmp_path / "run" / f"{DEFAULT_ARM}-seed0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3] and all("loss" in r for r in log[1:])
    assert [r["step"] for r in log if "within_image_share" in r] == [0, 2, 3]
    text = report.read_text()
    assert "Reduced run" in text and "| I-JEPA (aggregation none) |" in text and "python benchmarks/study.py --smoke" in text
    assert "Paired differences" in text and "Target locality" in text
    for arm in arms:
        assert Image.open(report.parent / "results" / f"{arm}-pca.png").size == (384, 192)
        assert f"results/{arm}-attention.png" in text
    assert Image.open(report.parent / "results" / "i-jepa-curves.png").size == (900, 300)
    # every job left its record: summarising again trains nothing and gives the same tables
    again = run_study(cfg, tmp_path / "run", None, "again", run=False)
    assert again["table"] == summary["table"] and json.dumps(again["paired"]) == json.dumps(summary["paired"])
