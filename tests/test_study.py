"""Smoke run of the study: one seed, a few steps, every arm evaluated and the report written."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks.study import StudyConfig, run_study


@pytest.mark.slow
def test_study_smoke_one_seed_few_steps(tmp_path) -> None:
    cfg = StudyConfig(
        seeds=[0], steps=3, batch_size=4, arch="vit_nano", image_size=64, pred_width=32, pred_depth=1,
        min_keep=4, train_scenes=24, test_scenes=12, dense_epochs=1, workers=1,
    )
    report = tmp_path / "docs" / "results.md"
    summary = run_study(cfg, tmp_path / "run", report, "python benchmarks/study.py --smoke", reduced=True)
    assert set(summary["table"]) == {"dmt-jepa", "dmt-jepa-mean", "i-jepa", "random"}
    for method, row in summary["table"].items():
        for metric in ("knn", "linear", "dense", "fg"):
            mean, std = row[metric]
            assert 0.0 <= mean <= 100.0 and std == 0.0
    log = [json.loads(l) for l in (tmp_path / "run" / "dmt-jepa-seed0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all("loss" in r and "lr" in r for r in log)
    text = report.read_text()
    assert "Reduced run" in text and "| I-JEPA (none) |" in text and "python benchmarks/study.py --smoke" in text
    for method in ("dmt-jepa", "dmt-jepa-mean", "i-jepa", "random"):
        assert Image.open(report.parent / "results" / f"{method}-pca.png").size == (384, 192)
        assert f"results/{method}-attention.png" in text
    assert Image.open(report.parent / "results" / "i-jepa-curves.png").size == (800, 300)
