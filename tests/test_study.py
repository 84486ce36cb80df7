"""The study: paired differences and the validation choice by hand; a smoke run of every stage."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.study import (
    ARMS,
    DEFAULT_ARM,
    RULE_MARGIN,
    StudyConfig,
    _miou_of,
    bootstrap_paired_se,
    departures,
    job_name,
    paired_differences,
    run_study,
    select_default,
    selection_path,
    two_level,
)
from dmt_jepa.config import TargetConfig, load_config
from dmt_jepa.evaluation.dense import iou_per_class

ROOT = Path(__file__).resolve().parents[1]


def _run(data_seed, seed, sem, sem_val=0.0):
    split = lambda v: {"fg": {"miou": v}, "dense": {"miou": v}}  # noqa: E731
    return {
        "data_seed": data_seed,
        "seed": seed,
        "target": {"test": split(sem), "val": split(sem_val)},
        "secondary": {"knn": {"top1": 2.0}, "linear": {"top1": 3.0}},
    }


def test_two_level_by_hand() -> None:
    d = two_level({(0, 0): 1.0, (0, 1): 3.0, (1, 0): 5.0, (1, 1): 7.0})
    assert d["per_draw"] == {"0": 2.0, "1": 6.0} and d["mean"] == pytest.approx(4.0)
    assert d["sd_draw_means"] == pytest.approx(math.sqrt(8.0)) and d["se"] == pytest.approx(2.0)  # stdev(2, 6) / sqrt(2)
    assert d["sd_within"] == pytest.approx(math.sqrt(2.0))  # variance of (1, 3) and of (5, 7): 2 each
    assert d["sd_between"] == pytest.approx(math.sqrt(8.0 - 2.0 / 2))  # draw means' variance less within / seeds per draw


def test_two_level_draws_that_agree_add_nothing() -> None:
    """Draws whose means agree add no variance of their own, however noisy the seeds inside them."""
    d = two_level({(0, 0): 0.0, (0, 1): 10.0, (1, 0): 10.0, (1, 1): 0.0})
    assert d["sd_draw_means"] == 0.0 and d["sd_between"] == 0.0 and d["sd_within"] == pytest.approx(math.sqrt(50.0))


def test_the_standard_error_treats_the_draw_as_the_unit() -> None:
    """Many model seeds on one draw do not shrink the s.e.: it is measured between draws."""
    rng = np.random.default_rng(0)
    draw_effect = {d: rng.normal(0, 3.0) for d in range(8)}
    values = {(d, s): draw_effect[d] + rng.normal(0, 0.1) for d in range(8) for s in range(50)}
    d = two_level(values)
    assert d["se"] == pytest.approx(np.std(list(draw_effect.values()), ddof=1) / math.sqrt(8), rel=0.05)
    assert d["sd_between"] == pytest.approx(np.std(list(draw_effect.values()), ddof=1), rel=0.05)


def test_paired_differences_pair_the_same_draw_and_seed() -> None:
    results = {
        "i-jepa": [_run(0, 0, 50.0), _run(0, 1, 52.0), _run(1, 0, 51.0), _run(1, 1, 40.0)],
        "dmt": [_run(0, 0, 53.0), _run(0, 1, 53.0), _run(1, 0, 50.0), _run(1, 1, 45.0), _run(2, 0, 99.0)],
    }
    d = paired_differences(results)["dmt"]
    assert d["units"] == [(0, 0), (0, 1), (1, 0), (1, 1)]  # draw 2 has no I-JEPA partner and is left out
    assert d["sem"]["per_draw"] == {"0": 2.0, "1": 2.0}  # (3 + 1) / 2 and (-1 + 5) / 2
    assert d["sem"]["mean"] == pytest.approx(2.0) and d["sem"]["se"] == 0.0


def test_the_rule_chooses_on_validation_with_a_margin_over_draws() -> None:
    def arm(sem, sem_vals):  # one run per draw
        return [_run(d, 0, sem, v) for d, v in enumerate(sem_vals)]

    base = arm(50.0, [50.0, 50.0, 50.0, 50.0])
    results = {
        "i-jepa": base,
        "a": arm(60.0, [49.0, 49.0, 49.0, 49.0]),  # far ahead on test, behind on validation
        "b": arm(40.0, [51.0, 51.5, 52.0, 51.5]),
    }  # ahead on validation by many s.e.
    assert select_default(paired_differences(results), ["a", "b"])["arm"] == "b"
    results["b"] = arm(40.0, [50.5, 49.0, 53.0, 50.5])  # ahead on average by 0.75, s.e. 0.83: under the margin
    d = paired_differences(results)["b"]["sem_val"]
    assert 0 < d["mean"] < RULE_MARGIN * d["se"]
    choice = select_default(paired_differences(results), ["a", "b"])
    assert choice["arm"] == "i-jepa" and "best b" in choice["reason"]
    # An arm on fewer runs does not compete with the best-covered ones, however far ahead its mean.
    results["b"] = arm(40.0, [51.0, 51.5, 52.0, 51.5])
    results["c"] = arm(40.0, [60.0, 61.0])
    choice = select_default(paired_differences(results), ["a", "b", "c"])
    assert choice["arm"] == "b" and "4 draws" in choice["reason"]


def test_the_shipped_default_follows_the_rule() -> None:
    """The target settings `dmtjepa pretrain` trains (the dataclass and the demo recipe) are what the last complete
    study's rule chose (docs/results/selection.json); the study's default arm is the same."""
    selection = json.loads(selection_path(ROOT / "docs" / "results.md").read_text())
    settings = ARMS[selection["arm"]][0]
    assert settings == selection["settings"]
    demos = [load_config(folder / "demo.yaml").target for folder in (ROOT / "configs", ROOT / "dmt_jepa" / "configs")]
    for target in [asdict(TargetConfig())] + [asdict(demo) for demo in demos]:
        assert {k: target[k] for k in settings} == settings
    assert DEFAULT_ARM == selection["arm"]


def test_miou_of_summed_confusions_matches_iou_per_class() -> None:
    confusion = np.random.default_rng(0).integers(0, 50, size=(3, 4, 4))
    expected = [100 * np.nanmean(iou_per_class(c)) for c in confusion]
    assert np.allclose(_miou_of(confusion), expected)


def test_paired_bootstrap_cancels_what_both_arms_share(tmp_path) -> None:
    """Resampling the same scenes for both arms: identical arms differ by exactly 0 in every resample."""
    rng = np.random.default_rng(0)
    (tmp_path / "jobs").mkdir()
    shared = rng.integers(0, 100, size=(2, 300, 2, 2))
    units = [(0, 0), (1, 0)]
    for arm, conf in (("a", shared), ("b", shared), ("c", rng.integers(0, 100, size=(2, 300, 2, 2)))):
        for index, (data_seed, seed) in enumerate(units):
            np.savez(tmp_path / "jobs" / f"{job_name(arm, data_seed, seed)}-confusions.npz", target_dense=conf[index])
    jobs = tmp_path / "jobs"
    assert bootstrap_paired_se(jobs, "a", units, baseline="b", samples=50) == 0.0
    alone = bootstrap_paired_se(jobs, "c", units, baseline=None, samples=200)
    assert 0.0 < alone < bootstrap_paired_se(jobs, "c", units, baseline="b", samples=200) * 2


@pytest.mark.slow
def test_study_smoke_two_draws_two_seeds_few_steps(tmp_path) -> None:
    cfg = StudyConfig(
        data_seeds=[0, 1],
        seeds=[0, 1],
        ablation_seeds=[0],
        control_seeds=[0],
        steps=4,
        batch_size=4,
        arch="vit_nano",
        patch_size=8,
        image_size=48,
        pred_width=32,
        pred_depth=1,
        min_keep=4,
        train_scenes=24,
        val_scenes=8,
        test_scenes=12,
        workers=1,
        locality_every=2,
        locality_images=4,
        ablations=["dmt-jepa-no-context"],
        bootstrap=20,
        scenes="shapes",
    )
    report = tmp_path / "docs" / "results.md"
    first = StudyConfig(**(asdict(cfg) | {"seeds": [0]}))  # a study cut short after its first model seed
    run_study(first, tmp_path / "run", None, "first part")  # no report: its pictures stay in the run folder
    run_study(first, tmp_path / "run", report, "first part", reduced=True, run=False, declared=cfg)
    assert "Reduced run" in report.read_text() and not selection_path(report).exists()  # a reduced run chooses nothing
    assert (report.parent / "results" / "results" / "i-jepa-pca.png").is_file()  # copied beside the report
    partial = run_study(cfg, tmp_path / "run", report, "summarise what ran", run=False, declared=cfg)
    assert (
        not partial["complete"]
        and partial["jobs_done"] == 3 * 2 + 2 + 2
        and "**Partial**: 10 of the 16 jobs" in report.read_text()
    )
    assert not selection_path(report).exists()  # a partial study chooses nothing
    summary = run_study(cfg, tmp_path / "run", report, "python benchmarks/study.py --smoke", reduced=False, declared=cfg)
    assert summary["complete"] and summary["jobs_done"] == 3 * 4 + 2 + 2
    assert cfg.arms == ["i-jepa", "mean-pool", "dmt-jepa"]  # DEFAULT_ARM, i-jepa today, is among them
    arms = set(cfg.arms) | {"dmt-jepa-no-context", "random"}
    assert set(summary["table"]) == arms and set(summary["paired"]) == arms - {"i-jepa"}
    for arm, row in summary["table"].items():
        for name in ("sem", "sem_val", "fg", "fg_val", "knn", "linear"):
            assert 0.0 <= row[name]["mean"] <= 100.0 and row[name]["draws"] == 2
        assert row["sem"]["units"] == (4 if arm in cfg.arms else 2)
        assert ("within_image_share" in row) == (arm != "random")
    for arm, d in summary["paired"].items():
        expected = [(0, 0), (0, 1), (1, 0), (1, 1)] if arm in cfg.arms else [(0, 0), (1, 0)]
        assert d["units"] == expected and set(d["sem"]["per_draw"]) == {"0", "1"}
    assert set(summary["ablation_table"]) == {"mean-pool", "dmt-jepa", "dmt-jepa-no-context"}
    assert all(se >= 0 for se in summary["test_set_se"].values())
    assert 0 < summary["ceiling"]["sem"] <= summary["ceiling"]["fg"] <= 100
    log = [json.loads(line) for line in (tmp_path / "run" / f"{job_name('dmt-jepa', 1, 0)}.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4] and all("loss" in r for r in log[1:])
    assert [r["step"] for r in log if "cos_to_own_patch" in r] == [0, 2, 4]
    text = report.read_text()
    assert "**Partial**" not in text and "| I-JEPA (aggregation none) |" in text and "python benchmarks/study.py --smoke" in text
    assert "Two levels" in text and "Ablations" in text and "The rule and its output" in text
    assert "a 6x6 patch grid" in text and "| nan" not in text  # one-seed arms: no split of their SD, a dash
    selection = json.loads(selection_path(report).read_text())
    assert selection["arm"] == summary["selection"]["arm"] and selection["settings"] == ARMS[selection["arm"]][0]
    for arm in ("i-jepa", DEFAULT_ARM, "random"):
        assert Image.open(report.parent / "results" / "results" / f"{arm}-pca.png").size == (384, 192)
        assert f"results/results/{arm}-attention.png" in text
    assert Image.open(report.parent / "results" / "results" / "i-jepa-curves.png").size == (900, 300)
    # the same complete jobs under a study other than the declared one: reported, the rule's output not applied
    other = tmp_path / "other" / "grid.md"
    elsewhere_summary = run_study(cfg, tmp_path / "run", other, "a second scale", run=False)
    assert elsewhere_summary["complete"] and "image_size 48 (declared 64)" in elsewhere_summary["departures"]
    assert "**Another configuration than the declared study**" in other.read_text()
    assert not selection_path(other).exists() and (other.parent / "results" / "grid" / "i-jepa-pca.png").is_file()
    # every job left its record: summarising again trains nothing and gives the same tables
    again = run_study(cfg, tmp_path / "run", None, "again", run=False)
    assert json.dumps(again["table"]) == json.dumps(summary["table"]) and json.dumps(again["paired"]) == json.dumps(
        summary["paired"]
    )
    # the job records alone carry the study to another machine: the draws are remade from their seeds
    carried = shutil.copytree(tmp_path / "run" / "jobs", tmp_path / "carried")
    elsewhere = run_study(cfg, tmp_path / "elsewhere", None, "elsewhere", run=False, jobs_dir=carried)
    assert not (tmp_path / "elsewhere" / "jobs").exists() and elsewhere["complete"]
    for key in ("table", "paired", "test_set_se", "ceiling", "selection"):
        assert json.dumps(elsewhere[key]) == json.dumps(summary[key]), key
    # reported there, where the pictures the records name were not carried: the report says what it has
    shutil.rmtree(tmp_path / "run")
    run_study(cfg, tmp_path / "elsewhere", tmp_path / "elsewhere" / "report.md", "elsewhere", run=False, jobs_dir=carried)
    text = (tmp_path / "elsewhere" / "report.md").read_text()
    assert "## Two levels" in text and "![PCA]" not in text


def test_departures_name_what_a_study_measures_differently_not_how_it_runs() -> None:
    declared = StudyConfig()
    assert departures(StudyConfig(workers=1, threads=4, device="cuda"), declared) == []
    assert departures(StudyConfig(image_size=96, seeds=[0, 1]), declared) == [
        "seeds [0, 1] (declared [0, 1, 2, 3])",
        "image_size 96 (declared 64)",
    ]
